"""The app: the ReviewApp facade over the core, and its Gradio UI."""
