"""postoffice: a complete, fast, secure mail server (SMTP, Maildir, MX relay, POP3)."""

__version__ = "0.1.0"
