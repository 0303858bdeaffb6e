"""catreview: review and improve a cat-breed classifier with a vision-language model in the loop.

Data flows one way: images -> predictions (stage 1 timm, stage 2 VLM) -> reviews -> exports ->
training -> adapters. One module per concept; the Gradio UI (:mod:`catreview.app.ui`) is thin.
"""

__version__ = "0.1.0"
