"""RFC 9162 Merkle tree: known answers, properties, adversarial proofs, the node store."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_consent.ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    InvalidProofError,
    MemoryTreeStore,
    MerkleError,
    MerkleTree,
    MissingNodeError,
    Node,
    NodeKey,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_inclusion_proof,
    root_from_leaf_hashes,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# ---------------------------------------------------------------------------------------------
# Known-answer vectors. Source: github.com/transparency-dev/merkle, proof/verify_test.go
# (variables `leaves`, `roots`, `inclusionProofs`, `consistencyProofs`; Apache-2.0), which
# inherited them from certificate-transparency-go / the RFC 6962 reference tests. In
# `inclusionProofs` the first number is a 1-based leaf number, hence the `- 1` below.
# ---------------------------------------------------------------------------------------------

LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
ROOTS = [
    bytes.fromhex(h)
    for h in [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]


def _h(*hexes: str) -> list[bytes]:
    return [bytes.fromhex(x) for x in hexes]


INCLUSION_VECTORS = [  # (1-based leaf, size, proof)
    (1, 1, []),
    (
        1,
        8,
        _h(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        6,
        8,
        _h(
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (3, 3, _h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")),
    (
        2,
        5,
        _h(
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
]

CONSISTENCY_VECTORS = [  # (size1, size2, proof)
    (1, 1, []),
    (
        1,
        8,
        _h(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ),
    ),
    (
        6,
        8,
        _h(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
    (
        2,
        5,
        _h(
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ),
    ),
    (
        6,
        7,
        _h(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ),
    ),
]


def _tree(leaves: Sequence[bytes]) -> MerkleTree:
    t = MerkleTree(MemoryTreeStore())
    for d in leaves:
        t.append(d)
    return t


@pytest.fixture(scope="module")
def kat_tree() -> MerkleTree:
    return _tree(LEAVES)


def test_empty_tree() -> None:
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert MerkleTree(MemoryTreeStore()).root() == EMPTY_ROOT
    assert tree_root(0, MemoryTreeStore()) == EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9))
def test_known_roots(size: int, kat_tree: MerkleTree) -> None:
    assert root(LEAVES[:size]) == ROOTS[size - 1]
    assert kat_tree.root(size) == ROOTS[size - 1]
    assert _tree(LEAVES[:size]).root() == ROOTS[size - 1]


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION_VECTORS)
def test_known_inclusion_proofs(
    leaf: int, size: int, proof: list[bytes], kat_tree: MerkleTree
) -> None:
    assert kat_tree.inclusion_proof(leaf - 1, size) == proof
    verify_inclusion(leaf_hash(LEAVES[leaf - 1]), leaf - 1, size, proof, ROOTS[size - 1])


@pytest.mark.parametrize(("m", "n", "proof"), CONSISTENCY_VECTORS)
def test_known_consistency_proofs(m: int, n: int, proof: list[bytes], kat_tree: MerkleTree) -> None:
    assert kat_tree.consistency_proof(m, n) == proof
    verify_consistency(m, n, proof, ROOTS[m - 1], ROOTS[n - 1])


def test_all_proofs_over_the_known_leaves(kat_tree: MerkleTree) -> None:
    for n in range(1, 9):
        for i in range(n):
            p = kat_tree.inclusion_proof(i, n)
            assert p == ref_path(i, [leaf_hash(d) for d in LEAVES[:n]])
            verify_inclusion(leaf_hash(LEAVES[i]), i, n, p, ROOTS[n - 1])
        for m in range(1, n + 1):
            p = kat_tree.consistency_proof(m, n)
            verify_consistency(m, n, p, ROOTS[m - 1], ROOTS[n - 1])


# ---------------------------------------------------------------------------------------------
# A literal, slow transcription of RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1 as the oracle.
# ---------------------------------------------------------------------------------------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = _k(len(hashes))
    return node_hash(ref_mth(hashes[:k]), ref_mth(hashes[k:]))


def ref_path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    n = len(hashes)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return ref_path(m, hashes[:k]) + [ref_mth(hashes[k:])]
    return ref_path(m - k, hashes[k:]) + [ref_mth(hashes[:k])]


def ref_subproof(m: int, hashes: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if b else [ref_mth(hashes)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, hashes[:k], b) + [ref_mth(hashes[k:])]
    return ref_subproof(m - k, hashes[k:], False) + [ref_mth(hashes[:k])]


def ref_proof(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    return [] if m in (0, len(hashes)) else ref_subproof(m, hashes, True)


def _hashes(n: int, salt: bytes = b"") -> list[bytes]:
    return [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


_BIG = _hashes(600)
_BIG_TREE = MerkleTree(MemoryTreeStore())
_BIG_TREE.extend(_BIG)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_inclusion_proofs_verify(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 300), label="size")
    i = data.draw(st.integers(0, n - 1), label="index")
    proof = _BIG_TREE.inclusion_proof(i, n)
    assert proof == ref_path(i, _BIG[:n])
    r = _BIG_TREE.root(n)
    assert r == ref_mth(_BIG[:n])
    verify_inclusion(_BIG[i], i, n, proof, r)
    assert root_from_inclusion_proof(_BIG[i], i, n, proof) == r


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_consistency_proofs_verify(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 300), label="n")
    m = data.draw(st.integers(0, n), label="m")
    proof = _BIG_TREE.consistency_proof(m, n)
    assert proof == ref_proof(m, _BIG[:n])
    verify_consistency(m, n, proof, _BIG_TREE.root(m), _BIG_TREE.root(n))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=8), max_size=40))
def test_root_matches_reference(entries: list[bytes]) -> None:
    hashes = [leaf_hash(e) for e in entries]
    assert root(entries) == ref_mth(hashes) == root_from_leaf_hashes(hashes)


# ---------------------------------------------------------------------------------------------
# Adversarial proofs (all must be rejected)
# ---------------------------------------------------------------------------------------------

SOME_HASH = hashlib.sha256(b"some other hash").digest()


def _fork(n: int, at: int) -> MerkleTree:
    leaves = list(_BIG[:n])
    leaves[at] = leaf_hash(b"forged entry")
    t = MerkleTree(MemoryTreeStore())
    t.extend(leaves)
    return t


def _same_inclusion_shape(i: int, n: int, other: int, length: int) -> bool:
    """Whether RFC 9162 §2.1.3.2 combines a path of ``length`` identically for both sizes."""
    dummies = [hashlib.sha256(bytes([k])).digest() for k in range(length)]
    try:
        a = root_from_inclusion_proof(SOME_HASH, i, n, dummies)
        b = root_from_inclusion_proof(SOME_HASH, i, other, dummies)
    except InvalidProofError:
        return False
    return a == b


def _rejects_inclusion(leaf: bytes, i: int, n: int, proof: Sequence[bytes], r: bytes) -> None:
    with pytest.raises(InvalidProofError):
        verify_inclusion(leaf, i, n, proof, r)


INCLUSION_CASES = [(0, 1), (0, 2), (1, 2), (5, 7), (6, 7), (3, 8), (12, 13), (100, 300), (299, 300)]


@pytest.mark.parametrize(("i", "n"), INCLUSION_CASES)
def test_adversarial_inclusion(i: int, n: int) -> None:
    leaf, proof, r = _BIG[i], _BIG_TREE.inclusion_proof(i, n), _BIG_TREE.root(n)
    verify_inclusion(leaf, i, n, proof, r)
    # wrong size: checked against the (signed, honest) root of another size
    for bad_n in {n - 1, n + 1, 2 * n, n // 2, n + 2}:
        if 0 < bad_n != n and i < bad_n:
            _rejects_inclusion(leaf, i, bad_n, proof, _BIG_TREE.root(bad_n))
            # With this size's root but a wrong size, RFC 9162 verification can only succeed
            # when both sizes give the path the same left/right shape (e.g. index 5 in sizes 7
            # and 8), because a leaf hash and an interior hash are indistinguishable there. A
            # checkpoint signs size and root together, so that pairing cannot be presented.
            if not _same_inclusion_shape(i, n, bad_n, len(proof)):
                _rejects_inclusion(leaf, i, bad_n, proof, r)
    # wrong index
    for bad_i in {i - 1, i + 1, i ^ 2, i ^ 1, n, -1}:
        if bad_i != i:
            _rejects_inclusion(leaf, bad_i, n, proof, r)
    # wrong leaf / root
    _rejects_inclusion(SOME_HASH, i, n, proof, r)
    _rejects_inclusion(leaf, i, n, proof, SOME_HASH)
    _rejects_inclusion(leaf, i, n, proof, EMPTY_ROOT)
    _rejects_inclusion(leaf, i, n, proof, b"short")
    # extended path
    _rejects_inclusion(leaf, i, n, [*proof, SOME_HASH], r)
    _rejects_inclusion(leaf, i, n, [*proof, r], r)
    _rejects_inclusion(leaf, i, n, [*proof, b""], r)
    _rejects_inclusion(leaf, i, n, [SOME_HASH, *proof], r)
    _rejects_inclusion(leaf, i, n, [b"", *proof], r)
    # shortened path
    if proof:
        _rejects_inclusion(leaf, i, n, proof[:-1], r)
        _rejects_inclusion(leaf, i, n, proof[1:], r)
    # swapped siblings
    for a in range(len(proof) - 1):
        swapped = list(proof)
        swapped[a], swapped[a + 1] = swapped[a + 1], swapped[a]
        _rejects_inclusion(leaf, i, n, swapped, r)
    # flipped bits, replaced and inserted components
    for a in range(len(proof)):
        flipped = list(proof)
        flipped[a] = bytes([flipped[a][0] ^ 8]) + flipped[a][1:]
        _rejects_inclusion(leaf, i, n, flipped, r)
        _rejects_inclusion(leaf, i, n, [*proof[:a], SOME_HASH, *proof[a:]], r)
    # forked tree: a different leaf somewhere at the same size
    for at in {i, 0, n - 1}:
        fork = _fork(n, at)
        fork_proof = fork.inclusion_proof(i, n)
        _rejects_inclusion(leaf, i, n, proof, fork.root())  # honest proof, forged checkpoint
        if at != i:
            _rejects_inclusion(leaf, i, n, fork_proof, r)  # forged proof, honest checkpoint
        else:
            _rejects_inclusion(leaf_hash(b"forged entry"), i, n, fork_proof, r)


def test_inclusion_rejects_impossible_arguments() -> None:
    for i, n in [(0, 0), (1, 1), (2, 1), (-1, 5)]:
        _rejects_inclusion(SOME_HASH, i, n, [], SOME_HASH)
    _rejects_inclusion(b"", 0, 1, [], b"")
    _rejects_inclusion(SOME_HASH[:31], 0, 1, [], SOME_HASH[:31])
    verify_inclusion(SOME_HASH, 0, 1, [], SOME_HASH)  # a 1-leaf tree: root = leaf hash


def _rejects_consistency(
    m: int, n: int, proof: Sequence[bytes], root_m: bytes, root_n: bytes
) -> None:
    with pytest.raises(InvalidProofError):
        verify_consistency(m, n, proof, root_m, root_n)


CONSISTENCY_CASES = [(1, 2), (1, 8), (2, 5), (3, 7), (4, 8), (6, 7), (6, 8), (7, 300), (255, 256)]


@pytest.mark.parametrize(("m", "n"), CONSISTENCY_CASES)
def test_adversarial_consistency(m: int, n: int) -> None:
    proof = _BIG_TREE.consistency_proof(m, n)
    rm, rn = _BIG_TREE.root(m), _BIG_TREE.root(n)
    verify_consistency(m, n, proof, rm, rn)
    # wrong sizes, each with the honest root of that size (what a signed checkpoint binds)
    for bad_m in {m - 1, m + 1, m ^ 2, n, 0}:
        if bad_m != m and 0 <= bad_m:
            _rejects_consistency(bad_m, n, proof, _BIG_TREE.root(bad_m), rn)
            _rejects_consistency(bad_m, n, proof, rm, rn)
    for bad_n in {n - 1, n + 1, 2 * n, n // 2, m}:
        if bad_n != n:
            _rejects_consistency(m, bad_n, proof, rm, _BIG_TREE.root(bad_n))
    _rejects_consistency(n, m, proof, rn, rm)  # time travel
    # wrong / swapped roots
    _rejects_consistency(m, n, proof, SOME_HASH, rn)
    _rejects_consistency(m, n, proof, rm, SOME_HASH)
    _rejects_consistency(m, n, proof, rn, rm)
    # empty, extended, shortened proofs
    _rejects_consistency(m, n, [], rm, rn)
    for extra in (b"", rm, rn, SOME_HASH, proof[0]):
        _rejects_consistency(m, n, [*proof, extra], rm, rn)
        _rejects_consistency(m, n, [extra, *proof], rm, rn)
    _rejects_consistency(m, n, proof[:-1], rm, rn)
    _rejects_consistency(m, n, proof[1:], rm, rn)
    # swapped siblings
    for a in range(len(proof) - 1):
        if proof[a] != proof[a + 1]:
            swapped = list(proof)
            swapped[a], swapped[a + 1] = swapped[a + 1], swapped[a]
            _rejects_consistency(m, n, swapped, rm, rn)
    # flipped bits
    for a in range(len(proof)):
        flipped = list(proof)
        flipped[a] = bytes([flipped[a][0] ^ 16]) + flipped[a][1:]
        _rejects_consistency(m, n, flipped, rm, rn)
    # forked trees: history rewritten inside the old tree, or a different new tree
    for at in {0, m - 1, m, n - 1}:
        if at >= n:
            continue
        fork = _fork(n, at)
        fork_proof = fork.consistency_proof(m, n)
        if at < m:
            # the fork changed the old tree: its own proof links fork roots only
            _rejects_consistency(m, n, fork_proof, rm, fork.root())
            _rejects_consistency(m, n, proof, rm, fork.root())
            _rejects_consistency(m, n, fork_proof, fork.root(m), rn)
        else:
            # the fork only differs in the new part: it is a different tree of size n
            _rejects_consistency(m, n, proof, rm, fork.root())
            verify_consistency(m, n, fork_proof, rm, fork.root())  # consistent, but not rn
            assert fork.root() != rn


def test_consistency_edge_cases() -> None:
    r1, r2 = _BIG_TREE.root(1), _BIG_TREE.root(2)
    verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    verify_consistency(0, 5, [], EMPTY_ROOT, _BIG_TREE.root(5))
    verify_consistency(1, 1, [], r1, r1)
    _rejects_consistency(1, 1, [], r1, r2)  # same size, different roots
    _rejects_consistency(1, 1, [EMPTY_ROOT], r1, r1)  # equal sizes need an empty proof
    _rejects_consistency(0, 1, [EMPTY_ROOT], EMPTY_ROOT, r1)
    _rejects_consistency(0, 1, [], SOME_HASH, r1)  # the empty tree has a fixed root
    _rejects_consistency(1, 0, [], r1, EMPTY_ROOT)
    _rejects_consistency(1, 2, [], r1, r2)
    _rejects_consistency(-1, 2, [], r1, r2)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_mutations_are_rejected(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 64), label="n")
    i = data.draw(st.integers(0, n - 1), label="i")
    proof = _BIG_TREE.inclusion_proof(i, n)
    r = _BIG_TREE.root(n)
    if not proof:
        return
    a = data.draw(st.integers(0, len(proof) - 1), label="position")
    byte = data.draw(st.integers(0, 31), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    mutated = list(proof)
    mutated[a] = mutated[a][:byte] + bytes([mutated[a][byte] ^ (1 << bit)]) + mutated[a][byte + 1 :]
    _rejects_inclusion(_BIG[i], i, n, mutated, r)
    m = data.draw(st.integers(1, n - 1), label="m")
    cproof = _BIG_TREE.consistency_proof(m, n)
    b = data.draw(st.integers(0, len(cproof) - 1), label="cposition")
    cmut = list(cproof)
    cmut[b] = cmut[b][:byte] + bytes([cmut[b][byte] ^ (1 << bit)]) + cmut[b][byte + 1 :]
    _rejects_consistency(m, n, cmut, _BIG_TREE.root(m), r)


# ---------------------------------------------------------------------------------------------
# The node store and appends
# ---------------------------------------------------------------------------------------------


class CountingStore(MemoryTreeStore):
    """Counts calls and keys, to check proofs read O(log n) nodes in one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.keys = 0

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        self.calls += 1
        self.keys += len(keys)
        return super().get_nodes(keys)


def test_append_emits_completed_subtrees() -> None:
    cr = CompactRange()
    assert cr.append(_BIG[0]) == [(0, 0, _BIG[0])]
    nodes = cr.append(_BIG[1])
    assert [(lv, i) for lv, i, _ in nodes] == [(0, 1), (1, 0)]
    assert nodes[1][2] == node_hash(_BIG[0], _BIG[1])
    cr.append(_BIG[2])
    nodes = cr.append(_BIG[3])
    assert [(lv, i) for lv, i, _ in nodes] == [(0, 3), (1, 1), (2, 0)]
    assert cr.root() == ref_mth(_BIG[:4])
    assert len(cr.hashes) == 1


def test_store_holds_every_perfect_subtree() -> None:
    store = MemoryTreeStore()
    t = MerkleTree(store)
    t.extend(_BIG[:77], batch=5)
    for level in range(7):
        width = 1 << level
        for idx in range(77 // width):
            got = store.get_nodes([(level, idx)])[(level, idx)]
            assert got == ref_mth(_BIG[idx * width : (idx + 1) * width])
        assert (level, 77 // width) not in store.get_nodes([(level, 77 // width)])


def test_proofs_read_log_n_nodes_in_one_batch() -> None:
    store = CountingStore()
    t = MerkleTree(store)
    n = 5000
    t.extend(_hashes(n))
    for i in (0, 1234, 4095, 4096, 4999):
        store.calls = store.keys = 0
        t.inclusion_proof(i, n)
        assert store.calls == 1 and store.keys <= 2 * n.bit_length()
    store.calls = store.keys = 0
    t.consistency_proof(1000, n)
    assert store.calls == 1 and store.keys <= 3 * n.bit_length()
    store.calls = store.keys = 0
    MerkleTree(store, n)  # reopening reads the compact range only
    assert store.calls == 1 and store.keys == n.bit_count()


def test_reopen_from_store_and_continue() -> None:
    store = MemoryTreeStore()
    t = MerkleTree(store)
    t.extend(_BIG[:100])
    t2 = MerkleTree(store, 100)
    assert t2.root() == t.root()
    for h in _BIG[100:150]:
        t2.append_leaf_hash(h)
    assert t2.root() == ref_mth(_BIG[:150])
    assert t2.root(100) == ref_mth(_BIG[:100])
    assert CompactRange.from_store(store, 150).root() == t2.root()


def test_missing_interior_nodes_are_rebuilt_and_memoised() -> None:
    store = CountingStore()
    store.put_nodes([(0, i, h) for i, h in enumerate(_BIG[:100])])  # leaves only
    assert inclusion_proof(37, 100, store) == ref_path(37, _BIG[:100])
    assert store.get_nodes([(5, 0)])[(5, 0)] == ref_mth(_BIG[:32])  # written back
    store.calls = 0
    assert consistency_proof(10, 100, store) == ref_proof(10, _BIG[:100])
    assert tree_root(100, store) == ref_mth(_BIG[:100])


def test_missing_leaves_are_an_error() -> None:
    t = _tree(LEAVES[:5])
    with pytest.raises(MissingNodeError):
        inclusion_proof(0, 6, t.store)
    with pytest.raises(MerkleError):
        t.inclusion_proof(0, 6)
    with pytest.raises(MerkleError):
        t.inclusion_proof(5, 5)
    with pytest.raises(MerkleError):
        t.consistency_proof(3, 6)
    with pytest.raises(MerkleError):
        t.root(6)


def test_store_rejects_conflicting_nodes() -> None:
    store = MemoryTreeStore()
    store.put_nodes([(0, 0, _BIG[0]), (0, 5, _BIG[5])])
    store.put_nodes([(0, 0, _BIG[0]), (0, 5, _BIG[5])])  # idempotent
    with pytest.raises(MerkleError):
        store.put_nodes([(0, 0, _BIG[1])])
    with pytest.raises(MerkleError):
        store.put_nodes([(0, 5, _BIG[1])])
    with pytest.raises(MerkleError):
        store.put_nodes([(0, 1, b"short")])


def test_leaf_callback_source() -> None:
    hashes = _BIG[:21]
    assert inclusion_proof(7, 21, hashes.__getitem__) == ref_path(7, hashes)
    assert consistency_proof(5, 21, hashes.__getitem__) == ref_proof(5, hashes)
    assert tree_root(21, hashes.__getitem__) == ref_mth(hashes)
    with pytest.raises(MissingNodeError):
        inclusion_proof(0, 22, hashes.__getitem__)


class DictStore:
    """The smallest possible TreeStore, as a DB-backed one would behave."""

    def __init__(self) -> None:
        self.rows: dict[NodeKey, bytes] = {}

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        return {k: self.rows[k] for k in keys if k in self.rows}

    def put_nodes(self, nodes: Sequence[Node]) -> None:
        for lv, i, h in nodes:
            if self.rows.setdefault((lv, i), h) != h:
                raise MerkleError("conflict")


def test_any_tree_store_implementation() -> None:
    store = DictStore()
    t = MerkleTree(store)
    for h in _BIG[:33]:
        t.append_leaf_hash(h)
    assert len(store.rows) == 33 + 16 + 8 + 4 + 2 + 1
    assert t.root() == ref_mth(_BIG[:33])
    assert t.inclusion_proof(32) == ref_path(32, _BIG[:33])
