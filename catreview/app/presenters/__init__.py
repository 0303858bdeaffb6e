"""Presenters: the text and Markdown users read (UI notices, tables, CLI reports), made from the core's typed results.

Core modules return data; these functions turn it into words. Gradio tabs (:mod:`catreview.app.ui`)
and the CLI (:mod:`catreview.cli`) both use them.
"""
