"""``cav ui``: a Gradio web app for the whole workflow on top of ``cav.api`` (runs are the CLI's run folders).

``app.py`` holds the callbacks (no Gradio), ``layout.py`` the page and ``serve``, ``guard.py`` what stands between
a browser and the server (same origin, own files only, login rate limit), ``jobs.py`` the training and generation
child processes (``child.py``, ``grid.py``), ``runs.py`` what is read from run folders, ``form.py`` the form ↔
recipe conversion.
"""
