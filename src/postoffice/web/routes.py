"""Every web page's route on the https listener's table (the composition root calls this)."""

from __future__ import annotations

from postoffice.net.http import Routes
from postoffice.services import Services
from postoffice.web import account, admin, dns_health, security
from postoffice.web.app import WebApp


def add_routes(routes: Routes, services: Services) -> WebApp:
    """The web pages, on the https listener's table."""
    web = WebApp(services)
    routes.add("/", web.home)
    routes.add("/login", web.login, ("GET", "POST"), max_body=security.MAX_LOGIN_BODY)
    routes.add("/logout", web.guarded(web.logout), ("POST",), max_body=security.MAX_LOGIN_BODY)
    for path in web.static:
        routes.add(path, web.static_file)
    account.add_routes(routes, web)
    admin.add_routes(routes, web)
    dns_health.add_routes(routes, web)
    return web
