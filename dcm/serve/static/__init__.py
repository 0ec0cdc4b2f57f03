"""The browser page ``python -m dcm.serve`` serves at ``/`` (files here, package data; no build step).

``index.html`` loads ``app.js`` (the page: prompts, objects, download), ``api.js`` (API key, lease, errors) and
``views.js`` (the three orthogonal views); ``style.css`` styles them. The README section "In the browser"
describes the controls and the view convention.
"""
