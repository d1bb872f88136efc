"""A FolderFiles from a list of names, for the IMAP index tests."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from postoffice.storage.imap_index import FileFacts
from postoffice.storage.maildir import arrival_key
from postoffice.storage.maildir_flags import info_flags

KEYWORDS = {"a": "$Forwarded", "b": "Work"}  # letter -> keyword, as dovecot-keywords


class ListedFiles:
    """Names as a listing gave them; facts from the name (S= and the time)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.files = list(names)
        self.missed: set[str] = set()  # stems a listing misses but ``gone`` finds

    @property
    def files(self) -> list[str]:
        return self._files

    @files.setter
    def files(self, names: list[str]) -> None:
        self._files = names
        self._present = frozenset(names)
        self.version = getattr(self, "version", 0) + 1

    def names(self) -> list[str]:
        return [n for n in self.files if n.partition(":2,")[0] not in self.missed]

    def facts(self, name: str) -> FileFacts | None:
        if name not in self._present:
            return None
        stem = name.partition(":2,")[0]
        size = int(stem.rpartition(",S=")[2]) if ",S=" in stem else 0
        return FileFacts(size=size, internaldate=arrival_key(name)[0])

    def gone(self, stems: Collection[str]) -> Collection[str]:
        present = {n.partition(":2,")[0] for n in self.files}
        return [s for s in stems if s not in present]

    def flags(self, info: str) -> frozenset[str]:
        return info_flags(info, KEYWORDS)

    def listing(self) -> str:
        # Moves with every change of ``names``' answer, as directory mtimes do.
        return f"{self.version} {','.join(sorted(self.missed))}"

    # --- what other Maildir tools do ------------------------------------------------
    def deliver(self, stem: str) -> None:
        self.files = [*self.files, stem]

    def rename(self, stem: str, info: str) -> None:
        self.files = [
            f"{stem}:2,{info}" if n.partition(":2,")[0] == stem else n for n in self.files
        ]

    def remove(self, stem: str) -> None:
        self.files = [n for n in self.files if n.partition(":2,")[0] != stem]


def stem(n: int, secs: int = 1_700_000_000) -> str:
    """A Maildir stem delivered at ``secs`` + ``n`` microseconds."""
    return f"{secs + n // 1_000_000}.M{n % 1_000_000}P42Q{n}R0000abcd.host,S={100 + n}"
