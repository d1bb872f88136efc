"""The admin and account web pages (issue 18), on [listen] https.

Why no ASGI framework: the https listener already exists (net/listener.py
for connection caps, the TLS handshake with its deadline, SNI and ACME
tls-alpn-01, reload and shutdown; net/http.py for h11 framing with bounded
heads, bodies and times).  Mounting Starlette or aiohttp behind it would
need an ASGI bridge of our own and a second request model, and would bring
form and multipart parsers we would then have to bound again; running it
beside it would be a second listener, TLS and reload path.  So the pages
are handlers on the same ``Routes`` table, in the same process and event
loop, with what a framework would add written small and tested here:

- ``render.py``   Jinja2 (autoescape always on, undefined names are errors),
                  templates and static files from package data;
- ``security.py`` sessions (random ids, rotated at login, idle and absolute
                  timeouts, bounded), CSRF tokens, the response headers
                  (CSP without inline script or style, frame denial), forms;
- ``app.py``      the page wrapper every route goes through (TLS, login,
                  admin flag and ``[web] admin_networks``, CSRF, Origin);
- ``account.py``, ``admin.py``  the pages.
"""
