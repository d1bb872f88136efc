"""The durable outbound queue under ``settings.queue_dir``.

Layout (one flat directory, so one directory fsync covers every rename)::

    queue/<id>.msg      "postoffice-queue 1 <envelope JSON>\\n" + the message (LF form)
    queue/<id>.json     per-recipient state, once anything has changed
    queue/<id>.remove   a removal requested by ``queue remove`` during an attempt
    queue/<id>.adopt    queued by an extra smtp process: the server delivers it
    queue/tmp/          files being written (never acknowledged; cleared at start)
    queue/flush         ``queue flush`` asks the running server to retry everything now

A message is committed (the 250) when its ``.msg`` has been fsync'd, renamed
out of ``tmp/`` and the directory fsync'd.  The envelope (sender, recipients,
arrival time) never changes, so it travels in the first line of that one
file: committing costs one file fsync and a share of one directory fsync.
Every state change after that is a new ``.json`` written to ``tmp/``,
fsync'd and renamed over the old one (atomic), then the directory fsync'd.
A finished message is unlinked (``.json`` then ``.msg``) and the directory
fsync'd, so a power cut can never bring a delivered message back.

The server holds an ``flock`` on ``<id>.msg`` while it works on a message
(a claim); ``queue remove`` takes the same lock, so the two never race.

The modules, each with one job:

    records.py    what a queued message is: envelope, recipients and their states
    lane.py       group commit of directory changes (one thread trip, one dir fsync)
    writer.py     a new message on its way in (a MessageSink, storage/sink.py)
    store.py      the files: load, recover, claim and release, remove, list
    message.py    a queued message as couriers read it
    requests.py   flush and hand-over requests between processes
"""
