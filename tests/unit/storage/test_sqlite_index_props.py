"""Random sequences of IMAP index operations keep its invariants.

Two folders, their files changed behind the index's back (deliveries,
removals, flag renames by another Maildir tool) and through it (APPEND,
STORE, EXPUNGE, COPY, MOVE), with restarts in between.  Throughout: a UID
names one file for the life of its UIDVALIDITY and new UIDs are above every
earlier one; HIGHESTMODSEQ never goes back and every change gets a larger
one; UIDVALIDITY stays put; after a sync the index holds exactly the files.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from postoffice.storage.imap_index import NewMessage, StoreMode
from postoffice.storage.sqlite_index import SqliteImapIndex
from tests.unit.storage.index_support import ListedFiles, stem

FOLDERS = ("INBOX", "Work")
FLAGS = st.frozensets(st.sampled_from(["\\Seen", "\\Flagged", "\\Deleted", "Work", "Other"]))
INFOS = st.sampled_from(["", "S", "F", "FS", "T", "Sb", "RS"])


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self.path = Path(self._dir.name) / "index.sqlite3"
        self.index = SqliteImapIndex(self.path)
        self.files = {name: ListedFiles() for name in FOLDERS}
        self.counter = itertools.count(1)
        self.uidvalidity = {name: self.index.ensure_folder(name).uidvalidity for name in FOLDERS}
        self.named: dict[str, dict[int, str]] = {name: {} for name in FOLDERS}  # uid -> stem
        self.top_uid = dict.fromkeys(FOLDERS, 0)
        self.modseq = dict.fromkeys(FOLDERS, 1)

    def teardown(self) -> None:
        self.index.close()
        self._dir.cleanup()

    # --- bookkeeping of what the index handed out ----------------------------------
    def _saw_uid(self, folder: str, uid: int, name: str, new: bool) -> None:
        stem_ = name.partition(":2,")[0]
        known = self.named[folder].get(uid)
        if known is None:
            assert new, f"UID {uid} in {folder} appeared without being allocated"
            assert uid > self.top_uid[folder], "a new UID not above the earlier ones"
            self.top_uid[folder] = uid
            self.named[folder][uid] = stem_
        else:
            assert known == stem_, f"UID {uid} in {folder} names two files"

    def _saw_modseq(self, folder: str, modseq: int, changed: bool) -> None:
        if changed:
            assert modseq > self.modseq[folder], "a change without a larger mod-sequence"
        else:
            assert modseq >= self.modseq[folder]
        self.modseq[folder] = modseq

    def _highest(self, folder: str) -> int:
        state = self.index.folder(folder)
        assert state is not None
        return state.highestmodseq

    def _live(self, folder: str) -> list[int]:
        return self.index.uids(folder)

    # --- what other Maildir tools do -------------------------------------------------
    @rule(folder=st.sampled_from(FOLDERS), count=st.integers(1, 3))
    def deliver(self, folder: str, count: int) -> None:
        for _ in range(count):
            self.files[folder].deliver(stem(next(self.counter)))

    @rule(folder=st.sampled_from(FOLDERS), data=st.data())
    def remove_file(self, folder: str, data: st.DataObject) -> None:
        names = self.files[folder].files
        if names:
            self.files[folder].remove(data.draw(st.sampled_from(names)).partition(":2,")[0])

    @rule(folder=st.sampled_from(FOLDERS), info=INFOS, data=st.data())
    def rename_flags(self, folder: str, info: str, data: st.DataObject) -> None:
        names = self.files[folder].files
        if names:
            self.files[folder].rename(data.draw(st.sampled_from(names)).partition(":2,")[0], info)

    # --- through the index -------------------------------------------------------------
    @rule(folder=st.sampled_from(FOLDERS))
    def sync(self, folder: str) -> None:
        before = {r.uid: r.flags for r in self.index.messages(folder)}
        result = self.index.sync(folder, self.files[folder])
        assert result.folder.uidvalidity == self.uidvalidity[folder]
        for record in result.added:
            self._saw_uid(folder, record.uid, record.stem, new=True)
        for record in result.flags_changed:
            self._saw_uid(folder, record.uid, record.stem, new=False)
            # "Other" has no Maildir letter: a rename by another tool keeps it.
            assert ("Other" in before[record.uid]) == ("Other" in record.flags)
        self._saw_modseq(folder, result.folder.highestmodseq, result.changed)
        on_disk = {n.partition(":2,")[0] for n in self.files[folder].files}
        assert {r.stem for r in self.index.messages(folder)} == on_disk

    @rule(folder=st.sampled_from(FOLDERS), flags=FLAGS, info=INFOS)
    def append(self, folder: str, flags: frozenset[str], info: str) -> None:
        name = stem(next(self.counter)) + (f":2,{info}" if info else "")
        self.files[folder].deliver(name)  # written first, then told (imap_index docs)
        [uid] = self.index.append(folder, [NewMessage(name, flags, 0, 1)])
        self._saw_uid(folder, uid, name, new=uid not in self.named[folder])
        self._saw_modseq(folder, self._highest(folder), True)

    @rule(
        folder=st.sampled_from(FOLDERS),
        mode=st.sampled_from(list(StoreMode)),
        flags=FLAGS,
        since=st.none() | st.integers(0, 40),
        data=st.data(),
    )
    def store(
        self,
        folder: str,
        mode: StoreMode,
        flags: frozenset[str],
        since: int | None,
        data: st.DataObject,
    ) -> None:
        live = self._live(folder)
        uids = data.draw(st.lists(st.sampled_from(live), max_size=4)) if live else []
        before = {r.uid: r for r in self.index.messages(folder)}
        result = self.index.store(folder, uids, mode, flags, since)
        for record in result.changed:
            assert record.modseq == result.modseq
            assert since is None or before[record.uid].modseq <= since
            self._saw_uid(folder, record.uid, record.stem, new=False)
        for uid in result.modified:
            assert since is not None and before[uid].modseq > since
        self._saw_modseq(folder, result.modseq, bool(result.changed))

    @rule(folder=st.sampled_from(FOLDERS), data=st.data())
    def expunge(self, folder: str, data: st.DataObject) -> None:
        live = self._live(folder)
        if not live:
            return
        uids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        for record in self.index.messages(folder):
            if record.uid in uids:
                self.files[folder].remove(record.stem)  # unlinked first, then told
        result = self.index.expunge(folder, uids)
        assert sorted(result.expunged) == sorted(uids)
        self._saw_modseq(folder, result.modseq, True)
        assert set(uids) <= set(self.index.vanished_since(folder, 0))

    @rule(source=st.sampled_from(FOLDERS), move=st.booleans(), data=st.data())
    def copy_or_move(self, source: str, move: bool, data: st.DataObject) -> None:
        target = FOLDERS[1 - FOLDERS.index(source)]
        records = self.index.messages(source)
        if not records:
            return
        chosen = data.draw(st.lists(st.sampled_from(records), min_size=1, max_size=3, unique=True))
        pairs = []
        for record in chosen:
            name = record.stem if move else stem(next(self.counter))
            if move:
                self.files[source].remove(record.stem)
            self.files[target].deliver(name)
            pairs.append((record.uid, name))
        op = self.index.move if move else self.index.copy
        result = op(source, target, pairs)
        assert result.uidvalidity == self.uidvalidity[target]
        for (_src, new_uid), (_uid, name) in zip(result.pairs, pairs, strict=True):
            self._saw_uid(target, new_uid, name, new=new_uid not in self.named[target])
        self._saw_modseq(target, self._highest(target), True)
        if move:
            self._saw_modseq(source, self._highest(source), True)

    @rule()
    def restart(self) -> None:
        self.index.close()
        self.index = SqliteImapIndex(self.path)

    # --- always --------------------------------------------------------------------------
    @invariant()
    def folder_state_is_consistent(self) -> None:
        for folder in FOLDERS:
            state = self.index.folder(folder)
            assert state is not None
            assert state.uidvalidity == self.uidvalidity[folder]
            assert state.highestmodseq == self.modseq[folder]
            records = self.index.messages(folder)
            assert all(r.uid < state.uidnext for r in records)
            assert all(r.modseq <= state.highestmodseq for r in records)
            assert state.uidnext == self.top_uid[folder] + 1
            for record in records:
                assert self.named[folder][record.uid] == record.stem


IndexMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_index_invariants = IndexMachine.TestCase
