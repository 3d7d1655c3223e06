"""RFC 9162 Merkle tree hashing, proofs and verification over a store of subtree hashes.

The embedded log is an RFC 9162 §2.1 Merkle Tree Hash (MTH) over the ledger entries
(ledger.md §2): ``leaf = SHA-256(0x00 || entry bytes)``, ``node = SHA-256(0x01 || left || right)``,
and the empty tree hashes to ``SHA-256("")``.

Storage model
-------------
A node is addressed by ``(level, index)``: level 0 holds leaf hashes, and node ``(l, i)`` is the
root of the *perfect* subtree over leaves ``[i * 2**l, (i + 1) * 2**l)``. Perfect subtrees never
change once their last leaf is appended, so their hashes can be stored forever and cached freely.
A :class:`TreeStore` holds them; :class:`CompactRange` appends a leaf in amortised O(1)
(worst case O(log n)) by emitting every perfect subtree the new leaf completes.

Every hash needed by the RFC 9162 algorithms — the audit path ``PATH(m, D[n])`` (§2.1.3.1), the
consistency proof ``PROOF(m, D[n])`` (§2.1.4.1) and the root ``MTH(D[n])`` at any past size — is
the MTH of a range ``[b, e)`` whose start is aligned to the next power of two ≥ ``e - b``. Such a
range is exactly the binary decomposition of its length into stored perfect subtrees, so a proof
costs O(log n) node reads, fetched in ONE :meth:`TreeStore.get_nodes` call, plus O(log n)
hashes. Nothing is ever recomputed from the leaves unless a node is missing from the store, in
which case it is rebuilt from its children and written back (memoised).

Verification implements RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency) literally.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol, runtime_checkable

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CallbackTreeStore",
    "CompactRange",
    "InvalidProofError",
    "MemoryTreeStore",
    "MerkleError",
    "MerkleTree",
    "MissingNodeError",
    "Node",
    "NodeKey",
    "TreeStore",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "root_from_inclusion_proof",
    "root_from_leaf_hashes",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
#: MTH({}) = SHA-256() — RFC 9162 §2.1.1.
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

#: ``(level, index)`` of a perfect subtree; level 0 = leaves.
NodeKey = tuple[int, int]
#: ``(level, index, hash)``.
Node = tuple[int, int, bytes]


class MerkleError(ValueError):
    """Base class for Merkle tree errors."""


class InvalidProofError(MerkleError):
    """An inclusion or consistency proof does not verify (RFC 9162 §2.1.3.2 / §2.1.4.2)."""


class MissingNodeError(MerkleError, LookupError):
    """A leaf hash needed for a root or proof is not in the store (the tree is smaller)."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)`` — RFC 9162 §2.1.1."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)`` — RFC 9162 §2.1.1."""
    return hashlib.sha256(b"\x01" + left + right).digest()


# --------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------


@runtime_checkable
class TreeStore(Protocol):
    """Storage of perfect-subtree hashes (leaf hashes are level 0).

    The lead backs this with a table ``ledger_node(level INT, idx BIGINT, hash BYTES(32),
    PRIMARY KEY (level, idx))`` written in the same transaction as the ledger entry.
    """

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        """Return the stored hashes of ``keys``; keys that are not stored are simply absent.

        Called once per proof/root with O(log n) keys (one ``SELECT … WHERE (level, idx) IN …``).
        """
        ...

    def put_nodes(self, nodes: Sequence[Node]) -> None:
        """Store ``(level, index, hash)`` rows. Nodes are immutable: storing the same hash
        again must be a no-op; storing a *different* hash for an existing key must fail."""
        ...


class MemoryTreeStore:
    """In-memory :class:`TreeStore`: one contiguous ``bytearray`` of 32-byte hashes per level
    (about 64 MB for 10**6 leaves), plus a dict for nodes written out of order."""

    __slots__ = ("_levels", "_extra")

    def __init__(self) -> None:
        self._levels: list[bytearray] = []
        self._extra: dict[NodeKey, bytes] = {}

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        out: dict[NodeKey, bytes] = {}
        levels = self._levels
        for key in keys:
            level, index = key
            if level < len(levels):
                arr = levels[level]
                off = index * HASH_SIZE
                if 0 <= off and off + HASH_SIZE <= len(arr):
                    out[key] = bytes(arr[off : off + HASH_SIZE])
                    continue
            extra = self._extra.get(key)
            if extra is not None:
                out[key] = extra
        return out

    def put_nodes(self, nodes: Sequence[Node]) -> None:
        levels = self._levels
        for level, index, h in nodes:
            if len(h) != HASH_SIZE or level < 0 or index < 0:
                raise MerkleError(f"invalid node ({level}, {index})")
            while len(levels) <= level:
                levels.append(bytearray())
            arr = levels[level]
            off = index * HASH_SIZE
            if off == len(arr):
                arr += h
                self._extra.pop((level, index), None)
            elif off < len(arr):
                if arr[off : off + HASH_SIZE] != h:
                    raise MerkleError(f"conflicting hash for immutable node ({level}, {index})")
            else:
                old = self._extra.setdefault((level, index), h)
                if old != h:
                    raise MerkleError(f"conflicting hash for immutable node ({level}, {index})")

    def leaf_count(self) -> int:
        """Number of contiguous leaf hashes stored."""
        return len(self._levels[0]) // HASH_SIZE if self._levels else 0


class CallbackTreeStore:
    """A :class:`TreeStore` over a ``get_leaf_hash(index) -> bytes`` callback, memoising the
    interior nodes it computes (in memory). ``get_leaf_hash`` may raise ``LookupError`` for an
    index beyond the tree."""

    __slots__ = ("_get_leaf_hash", "_memo")

    def __init__(self, get_leaf_hash: Callable[[int], bytes]) -> None:
        self._get_leaf_hash = get_leaf_hash
        self._memo = MemoryTreeStore()

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        out = self._memo.get_nodes([k for k in keys if k[0] > 0])
        for key in keys:
            if key[0] == 0:
                try:
                    out[key] = self._get_leaf_hash(key[1])
                except LookupError:
                    pass
        return out

    def put_nodes(self, nodes: Sequence[Node]) -> None:
        self._memo.put_nodes([n for n in nodes if n[0] > 0])


NodeSource = TreeStore | Callable[[int], bytes]


def _as_store(source: NodeSource) -> TreeStore:
    if isinstance(source, TreeStore):
        return source
    return CallbackTreeStore(source)


# --------------------------------------------------------------------------------------------
# Range arithmetic
# --------------------------------------------------------------------------------------------


def _split(n: int) -> int:
    """The largest power of two strictly less than ``n`` (n >= 2) — RFC 9162 §2.1.1's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def _range_keys(begin: int, end: int) -> list[NodeKey]:
    """Perfect subtrees whose right fold is ``MTH(D[begin:end])``, left to right.

    Valid when ``begin`` is a multiple of the smallest power of two >= ``end - begin`` (true for
    every range RFC 9162's PATH/PROOF/MTH recursion produces); the keys are then the binary
    digits of the range length, largest first.
    """
    n = end - begin
    if n <= 0 or begin % (1 << (n - 1).bit_length()) != 0:
        raise MerkleError(f"range [{begin}, {end}) is not a right-border subtree")
    keys: list[NodeKey] = []
    for level in range(n.bit_length() - 1, -1, -1):
        if n >> level & 1:
            keys.append((level, begin >> level))
            begin += 1 << level
    return keys


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Right fold ``node_hash(h0, node_hash(h1, … h_last))`` — the MTH of a right-border range."""
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = node_hash(left, h)
    return h


def _resolve(store: TreeStore, keys: Iterable[NodeKey]) -> dict[NodeKey, bytes]:
    """Fetch ``keys`` in one batch; rebuild (and store) any missing interior node."""
    wanted = list(dict.fromkeys(keys))
    found = dict(store.get_nodes(wanted))
    missing = [k for k in wanted if k not in found]
    if missing:
        leaves = [k[1] for k in missing if k[0] == 0]
        if leaves:
            raise MissingNodeError(f"leaf hash {min(leaves)} is not in the store")
        children = _resolve(
            store, [c for lv, i in missing for c in ((lv - 1, 2 * i), (lv - 1, 2 * i + 1))]
        )
        built = [
            (lv, i, node_hash(children[(lv - 1, 2 * i)], children[(lv - 1, 2 * i + 1)]))
            for lv, i in missing
        ]
        store.put_nodes(built)
        found.update({(lv, i): h for lv, i, h in built})
    for key in wanted:
        if len(found[key]) != HASH_SIZE:
            raise MerkleError(f"stored node {key} is not a {HASH_SIZE}-byte hash")
    return found


def _range_hashes(store: TreeStore, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    plans = [_range_keys(b, e) for b, e in ranges]
    nodes = _resolve(store, [k for plan in plans for k in plan])
    return [_fold([nodes[k] for k in plan]) for plan in plans]


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Ranges whose MTHs form ``PATH(index, D[size])`` (RFC 9162 §2.1.3.1), in proof order."""
    out: list[tuple[int, int]] = []
    begin, end = 0, size
    while end - begin > 1:
        k = _split(end - begin)
        if index < begin + k:  # PATH(m, D[0:k]) : MTH(D[k:n])
            out.append((begin + k, end))
            end = begin + k
        else:  # PATH(m - k, D[k:n]) : MTH(D[0:k])
            out.append((begin, begin + k))
            begin += k
    out.reverse()  # the sibling nearest the leaf comes first
    return out


def _consistency_ranges(m: int, n: int) -> list[tuple[int, int]]:
    """Ranges whose MTHs form ``PROOF(m, D[n])`` (RFC 9162 §2.1.4.1), in proof order."""
    out: list[tuple[int, int]] = []
    if m == 0 or m == n:
        return out
    begin, end, whole = 0, n, True  # SUBPROOF(m, D[begin:end], whole)
    while True:
        if m == end - begin:
            if not whole:
                out.append((begin, end))
            break
        k = _split(end - begin)
        if m <= k:  # SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            out.append((begin + k, end))
            end = begin + k
        else:  # SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            out.append((begin, begin + k))
            begin += k
            m -= k
            whole = False
    out.reverse()
    return out


# --------------------------------------------------------------------------------------------
# Roots and proofs
# --------------------------------------------------------------------------------------------


def root(entries: Sequence[bytes]) -> bytes:
    """``MTH(D[n])`` over raw leaf data ``entries`` (RFC 9162 §2.1.1)."""
    return root_from_leaf_hashes([leaf_hash(e) for e in entries])


def root_from_leaf_hashes(leaf_hashes: Iterable[bytes]) -> bytes:
    """``MTH`` of a tree given its leaf hashes, in O(n) time and O(log n) memory."""
    cr = CompactRange()
    for h in leaf_hashes:
        cr.append(h)
    return cr.root()


def tree_root(size: int, source: NodeSource) -> bytes:
    """``MTH(D[size])`` at any size from stored subtree hashes (O(log n) reads)."""
    if size < 0:
        raise MerkleError("negative tree size")
    if size == 0:
        return EMPTY_ROOT
    return _range_hashes(_as_store(source), [(0, size)])[0]


def inclusion_proof(index: int, size: int, source: NodeSource) -> list[bytes]:
    """The audit path ``PATH(index, D[size])`` (RFC 9162 §2.1.3.1).

    ``source`` is a :class:`TreeStore` (O(log n) node reads in one batch) or a
    ``get_leaf_hash(index)`` callback (memoised per call only — O(n) hashing).
    """
    if not 0 <= index < size:
        raise MerkleError(f"leaf index {index} is outside a tree of size {size}")
    return _range_hashes(_as_store(source), _inclusion_ranges(index, size))


def consistency_proof(m: int, n: int, source: NodeSource) -> list[bytes]:
    """The consistency proof ``PROOF(m, D[n])`` (RFC 9162 §2.1.4.1); empty if m = 0 or m = n."""
    if not 0 <= m <= n:
        raise MerkleError(f"no consistency proof from size {m} to size {n}")
    return _range_hashes(_as_store(source), _consistency_ranges(m, n))


class CompactRange:
    """The hashes of the perfect subtrees covering leaves ``[0, size)`` — one per set bit of
    ``size``, largest (leftmost) first. Enough to append leaves and to compute the current root.
    """

    __slots__ = ("size", "hashes")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0 or len(hashes) != size.bit_count():
            raise MerkleError("a compact range holds one hash per set bit of its size")
        self.size = size
        self.hashes: list[bytes] = list(hashes)

    @classmethod
    def from_store(cls, source: NodeSource, size: int) -> CompactRange:
        """Load the compact range of a tree of ``size`` leaves (O(log n) reads in one batch)."""
        if size == 0:
            return cls()
        keys = _range_keys(0, size)
        nodes = _resolve(_as_store(source), keys)
        return cls(size, [nodes[k] for k in keys])

    def append(self, leaf: bytes) -> list[Node]:
        """Append one leaf hash; return the nodes to store: the leaf itself at ``(0, index)``
        and every perfect subtree it completes (1 + trailing ones of ``index`` nodes)."""
        if len(leaf) != HASH_SIZE:
            raise MerkleError("a leaf hash is 32 bytes")
        index = self.size
        level, h = 0, leaf
        out: list[Node] = [(0, index, leaf)]
        while index & 1:
            h = node_hash(self.hashes.pop(), h)
            index >>= 1
            level += 1
            out.append((level, index, h))
        self.hashes.append(h)
        self.size += 1
        return out

    def root(self) -> bytes:
        """``MTH(D[size])``."""
        return _fold(self.hashes) if self.hashes else EMPTY_ROOT

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self.hashes)


class MerkleTree:
    """An append-only RFC 9162 tree over a :class:`TreeStore`.

    Construct it with the store and the current number of leaves (from the database); inside
    a database transaction, build it afresh so a rolled-back append leaves no stale state.
    Appends must be serialised by the caller (the ledger's ``seq`` allocation does that).
    """

    __slots__ = ("_store", "_range")

    def __init__(self, store: TreeStore, size: int = 0) -> None:
        self._store = store
        self._range = CompactRange.from_store(store, size)

    @property
    def size(self) -> int:
        return self._range.size

    @property
    def store(self) -> TreeStore:
        return self._store

    def append(self, data: bytes) -> int:
        """Append raw leaf data (an entry's bytes); return its leaf index."""
        return self.append_leaf_hash(leaf_hash(data))

    def append_leaf_hash(self, leaf: bytes) -> int:
        index = self._range.size
        cr = self._range.copy()
        self._store.put_nodes(cr.append(leaf))
        self._range = cr  # only advance once the nodes are stored
        return index

    def extend(self, leaf_hashes: Iterable[bytes], batch: int = 4096) -> None:
        """Append many leaf hashes, writing nodes in batches."""
        pending: list[Node] = []
        cr = self._range.copy()
        for h in leaf_hashes:
            pending.extend(cr.append(h))
            if len(pending) >= batch:
                self._store.put_nodes(pending)
                pending = []
        if pending:
            self._store.put_nodes(pending)
        self._range = cr

    def root(self, size: int | None = None) -> bytes:
        """The root now, or at an earlier ``size``."""
        if size is None or size == self.size:
            return self._range.root()
        self._check_size(size)
        return tree_root(size, self._store)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        self._check_size(size)
        return inclusion_proof(index, size, self._store)

    def consistency_proof(self, m: int, n: int | None = None) -> list[bytes]:
        n = self.size if n is None else n
        self._check_size(n)
        return consistency_proof(m, n, self._store)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise MerkleError(f"size {size} is outside the tree (size {self.size})")


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _check_hashes(what: str, hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise InvalidProofError(f"{what}[{i}] is not a {HASH_SIZE}-byte hash")


def _check_hash(what: str, h: bytes) -> None:
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise InvalidProofError(f"{what} is not a {HASH_SIZE}-byte hash")


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof — steps 1–4 of RFC 9162 §2.1.3.2.

    Raises :class:`InvalidProofError` if the proof has the wrong length for (index, size).
    """
    _check_hash("leaf hash", leaf)
    _check_hashes("proof", proof)
    if not 0 <= index < size:  # step 1
        raise InvalidProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn = index, size - 1  # step 2
    r = leaf  # step 3
    for p in proof:  # step 4
        if sn == 0:  # 4a
            raise InvalidProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:  # 4b
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # 4c
        sn >>= 1
    if sn != 0:  # step 5
        raise InvalidProofError("inclusion proof is too short")
    return r


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes
) -> None:
    """Verify that ``leaf`` (a leaf *hash*) is at ``index`` in the tree of ``size`` leaves whose
    root is ``root_hash`` — RFC 9162 §2.1.3.2. Raises :class:`InvalidProofError`."""
    _check_hash("root", root_hash)
    computed = root_from_inclusion_proof(leaf, index, size, proof)
    if not hmac.compare_digest(computed, root_hash):
        raise InvalidProofError("inclusion proof does not lead to the root")


def verify_consistency(
    m: int, n: int, proof: Sequence[bytes], root_m: bytes, root_n: bytes
) -> None:
    """Verify that the tree of size ``n`` (root ``root_n``) extends the tree of size ``m``
    (root ``root_m``) — RFC 9162 §2.1.4.2. Raises :class:`InvalidProofError`."""
    _check_hash("first root", root_m)
    _check_hash("second root", root_n)
    _check_hashes("proof", proof)
    if not 0 <= m <= n:
        raise InvalidProofError(f"sizes {m} -> {n} cannot be consistent")
    if m == n:
        if proof:
            raise InvalidProofError("a proof between equal sizes must be empty")
        if not hmac.compare_digest(root_m, root_n):
            raise InvalidProofError("different roots for the same size")
        return
    if m == 0:
        if proof:
            raise InvalidProofError("a proof from the empty tree must be empty")
        if not hmac.compare_digest(root_m, EMPTY_ROOT):
            raise InvalidProofError("the root of the empty tree is SHA-256 of the empty string")
        return
    if not proof:  # step 1
        raise InvalidProofError("consistency proof is empty")
    path = list(proof)
    if m & (m - 1) == 0:  # step 2: m is an exact power of 2
        path.insert(0, root_m)
    fn, sn = m - 1, n - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:  # 6a
            raise InvalidProofError("consistency proof is too long")
        if fn & 1 or fn == sn:  # 6b
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # 6c
        sn >>= 1
    if sn != 0:  # step 7
        raise InvalidProofError("consistency proof is too short")
    if not hmac.compare_digest(fr, root_m):
        raise InvalidProofError("consistency proof does not lead to the first root")
    if not hmac.compare_digest(sr, root_n):
        raise InvalidProofError("consistency proof does not lead to the second root")
