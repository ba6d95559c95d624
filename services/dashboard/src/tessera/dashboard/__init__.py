"""The Tessera dashboard: an HTTP service (port 8265, as Ray's) that shows what the control store holds.

``server.py`` wires it (the service app, the HTTP server, the change-event subscription); ``app.py`` maps HTTP
to the domain; ``model.py`` builds each page's figures from the state API (``tessera._state``) through
``source.py``; ``render.py`` turns them into HTML; ``live.py`` fans change events out to the browsers.
"""
