"""Client autoconfiguration on [listen] https: a mail client given only an
address finds its servers, ports and TLS modes here.

- Thunderbird's autoconfig (clientConfig 1.1, as Thunderbird's
  ``readFromXML.sys.mjs`` reads it) at ``/mail/config-v1.1.xml`` (on the host
  ``autoconfig.<domain>``) and ``/.well-known/autoconfig/mail/config-v1.1.xml``,
  ``?emailaddress=``;
- Microsoft's autodiscover "POX" (Outlook's plain-old-XML protocol,
  [MS-OXDSCLI]): ``POST /autodiscover/autodiscover.xml`` in any case, the
  address in the request's ``EMailAddress``;
- an Apple configuration profile (``.mobileconfig``, one
  ``com.apple.mail.managed`` payload) at ``/apple/mobileconfig?email=``.
  It is unsigned: iOS and macOS show it as "Unverified" and install it after
  the user confirms (signing needs a key the admin would have to keep for it).

Every document is written from config/client_endpoints.py at request time
(a reload that moves a listener changes them), names the server's
``hostname`` (its certificate's name) and logs in with the whole address.
Only local domains are answered (else 404), and nothing says whether a user
exists: the documents are the same for every address of a domain.
"""

from __future__ import annotations

import plistlib
import uuid
from xml.etree import ElementTree as ET

from postoffice.config.client_endpoints import Endpoint, incoming, outgoing
from postoffice.mail.address import Address, AddressError, parse_address
from postoffice.net.http import Request, Response, Routes
from postoffice.services import Services

THUNDERBIRD_PATHS = ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml")
AUTODISCOVER_PATHS = ("/autodiscover/autodiscover.xml",)  # matched in any case
MOBILECONFIG_PATH = "/apple/mobileconfig"
MAX_AUTODISCOVER_BODY = 16 * 1024  # the request is a few hundred octets

XML = "application/xml; charset=utf-8"
MOBILECONFIG = "application/x-apple-aspen-config"
AUTODISCOVER_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
# A fixed namespace for the profile's UUIDs: the same user's profile keeps
# its UUIDs, so installing it again replaces the old one instead of adding one.
_PROFILE_NAMESPACE = uuid.UUID("5b0c3f9e-6a57-4d38-9d6c-2f1c6f1e0a15")


def add_routes(routes: Routes, services: Services) -> None:
    """The autoconfiguration routes, on the https listener's table."""
    docs = Autoconfig(services)
    for path in THUNDERBIRD_PATHS:
        routes.add(path, docs.thunderbird)
    for path in AUTODISCOVER_PATHS:
        routes.add(
            path, docs.autodiscover, ("POST",), max_body=MAX_AUTODISCOVER_BODY, any_case=True
        )
    routes.add(MOBILECONFIG_PATH, docs.mobileconfig)


def _not_ours() -> Response:
    return Response.text(404, "no mail service for this address here")


class Autoconfig:
    def __init__(self, services: Services) -> None:
        self.services = services

    def _address(self, text: str | None) -> Address | None:
        """A well-formed address in a local domain, else None."""
        if not text:
            return None
        try:
            address = parse_address(text.strip(), utf8=True)
        except AddressError:
            return None
        if address.is_literal or not self.services.is_local_domain(address.domain):
            return None
        return address

    def _servers(self) -> tuple[list[Endpoint], list[Endpoint]]:
        settings = self.services.settings
        return (
            incoming(settings.listen, settings.hostname),
            outgoing(settings.listen, settings.hostname),
        )

    # --- Thunderbird -----------------------------------------------------------------
    async def thunderbird(self, request: Request) -> Response:
        """Thunderbird sends ?emailaddress=; without it, the autoconfig.<domain>
        host the request came to names the domain."""
        text = request.query.get("emailaddress")
        if text is not None:
            address = self._address(text)
            domain = address.domain if address is not None else ""
        else:
            domain = request.host.removeprefix("autoconfig.")
            if domain == request.host or not self.services.is_local_domain(domain):
                domain = ""
        if not domain:
            return _not_ours()
        return Response(200, thunderbird_xml(domain, *self._servers()), XML)

    # --- Outlook ---------------------------------------------------------------------
    async def autodiscover(self, request: Request) -> Response:
        address = self._address(_autodiscover_address(request.body))
        if address is None:
            return _not_ours()
        return Response(200, autodiscover_xml(address, *self._servers()), XML)

    # --- Apple -----------------------------------------------------------------------
    async def mobileconfig(self, request: Request) -> Response:
        address = self._address(request.query.get("email") or request.query.get("emailaddress"))
        if address is None:
            return _not_ours()
        settings = self.services.settings
        body = mobileconfig_plist(address, settings.hostname, *self._servers())
        if body is None:
            return Response.text(404, "no IMAP or POP3 and submission listener is on")
        disposition = f'attachment; filename="{address.domain}.mobileconfig"'
        return Response(200, body, MOBILECONFIG, (("Content-Disposition", disposition),))


# --- the documents ---------------------------------------------------------------------
SOCKET_TYPE = {"tls": "SSL", "starttls": "STARTTLS"}  # clientConfig's socketType


def thunderbird_xml(domain: str, inbound: list[Endpoint], outbound: list[Endpoint]) -> bytes:
    """clientConfig 1.1: one incomingServer per listener, best first (Thunderbird
    takes the first that works and offers the others as alternatives)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = domain
    ET.SubElement(provider, "displayShortName").text = domain
    for kind, servers in (("incomingServer", inbound), ("outgoingServer", outbound)):
        for server in servers:
            node = ET.SubElement(provider, kind, type=server.protocol)
            ET.SubElement(node, "hostname").text = server.host
            ET.SubElement(node, "port").text = str(server.port)
            ET.SubElement(node, "socketType").text = SOCKET_TYPE[server.security]
            # Our logins are the whole address (storage/accounts.py), checked
            # over TLS only: the password goes as it is (PLAIN / LOGIN / USER).
            ET.SubElement(node, "authentication").text = "password-cleartext"
            ET.SubElement(node, "username").text = "%EMAILADDRESS%"
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def _autodiscover_address(body: bytes) -> str | None:
    """``Request/EMailAddress`` of an autodiscover request, or None.  A DTD is
    refused before parsing: no entity can expand (billion laughs) or load."""
    if b"<!" in body:
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for node in root.iter():
        if node.tag.rsplit("}", 1)[-1] == "EMailAddress":
            return node.text
    return None


def _best_each(servers: list[Endpoint]) -> list[Endpoint]:
    """The first (best) endpoint of each protocol, in order."""
    seen: dict[str, Endpoint] = {}
    for server in servers:
        seen.setdefault(server.protocol, server)
    return list(seen.values())


def autodiscover_xml(address: Address, inbound: list[Endpoint], outbound: list[Endpoint]) -> bytes:
    """The POX response ([MS-OXDSCLI] §2.2.4): one Protocol per type (IMAP,
    POP3, SMTP), the best listener of each.  ``Encryption`` (which overrides
    ``SSL``) says the TLS mode: "SSL" for implicit TLS, "TLS" for STARTTLS."""
    ET.register_namespace("", AUTODISCOVER_RESPONSE)
    root = ET.Element(f"{{{AUTODISCOVER_RESPONSE}}}Autodiscover")
    response = ET.SubElement(root, f"{{{OUTLOOK_RESPONSE}}}Response")
    account = ET.SubElement(response, f"{{{OUTLOOK_RESPONSE}}}Account")

    def add(parent: ET.Element, name: str, text: str) -> None:
        ET.SubElement(parent, f"{{{OUTLOOK_RESPONSE}}}{name}").text = text

    add(account, "AccountType", "email")
    add(account, "Action", "settings")
    for server in _best_each(inbound) + _best_each(outbound):
        protocol = ET.SubElement(account, f"{{{OUTLOOK_RESPONSE}}}Protocol")
        add(protocol, "Type", server.protocol.upper())
        add(protocol, "Server", server.host)
        add(protocol, "Port", str(server.port))
        add(protocol, "LoginName", str(address))
        add(protocol, "DomainRequired", "off")
        add(protocol, "SPA", "off")  # Microsoft's NTLM login: not ours
        add(protocol, "SSL", "on")
        add(protocol, "Encryption", "SSL" if server.security == "tls" else "TLS")
        add(protocol, "AuthRequired", "on")
        if server.protocol == "smtp":
            add(protocol, "UsePOPAuth", "on")  # the same login as for reading
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def mobileconfig_plist(
    address: Address, hostname: str, inbound: list[Endpoint], outbound: list[Endpoint]
) -> bytes | None:
    """The profile (Apple's "Configuration Profile Reference", Mail payload):
    the best incoming and outgoing listener; None when one side is off.
    ``...UseSSL`` is true for implicit TLS and STARTTLS alike (Apple Mail
    then requires TLS; it uses STARTTLS on a STARTTLS port)."""
    if not inbound or not outbound:
        return None
    read, send = inbound[0], outbound[0]
    who = str(address)
    identifier = ".".join(reversed(hostname.split("."))) + ".mail." + who
    mail_uuid = uuid.uuid5(_PROFILE_NAMESPACE, f"mail {hostname} {who}")
    profile_uuid = uuid.uuid5(_PROFILE_NAMESPACE, f"profile {hostname} {who}")
    payload = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{identifier}.account",
        "PayloadUUID": str(mail_uuid).upper(),
        "PayloadDisplayName": f"Mail: {who}",
        "EmailAccountDescription": who,
        "EmailAccountType": "EmailTypeIMAP" if read.protocol == "imap" else "EmailTypePOP",
        "EmailAddress": who,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": read.host,
        "IncomingMailServerPortNumber": read.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": who,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": send.host,
        "OutgoingMailServerPortNumber": send.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": who,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier,
        "PayloadUUID": str(profile_uuid).upper(),
        "PayloadDisplayName": f"{address.domain} mail",
        "PayloadDescription": f"Mail settings for {who} on {hostname}",
        "PayloadOrganization": address.domain,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [payload],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)
