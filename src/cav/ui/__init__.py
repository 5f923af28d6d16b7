"""``cav ui``: a Gradio web app for the whole workflow on top of ``cav.api`` (runs are the CLI's run folders).

``app.py`` holds the callbacks (no Gradio), ``layout.py`` the page and ``serve``, ``jobs.py`` the training child
process, ``runs.py`` what is read from run folders, ``form.py`` the form ↔ recipe conversion.
"""
