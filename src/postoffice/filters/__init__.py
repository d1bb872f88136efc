"""Message filters: milters, Python hooks and the chain that runs them.

Why a package: an SMTP session asks the same questions of every filter
(connect, HELO, MAIL, RCPT, the message, delivered) whatever speaks behind
it, so the session talks to one interface (``interface.FilterSession``)
and each kind of filter is an adapter behind it:

- ``verdicts``: what a filter may answer (typed, frozen) and the
  modifications it may ask for at the message stage;
- ``interface``: the per-connection ``FilterSession`` protocol, the
  ``Filter`` factory that opens one per SMTP connection, and the facts
  and spooled message a filter is shown;
- ``chain``: runs the configured filters in config order, turns a filter's
  failure (exception, timeout) into its ``default_action``, and merges
  the answers.
"""
