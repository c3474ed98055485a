"""The pure maths of build_dict: batched per-token k-means, MCL k rule, seeding, collectives through a Comm."""
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dist_sense.config import KMeansConfig
from dist_sense.kmeans import distinct as kmeans_distinct
from dist_sense.kmeans import lloyd as kmeans_lloyd
from dist_sense.kmeans.distinct import distinct_senses, senses_of_rows
from dist_sense.kmeans.lloyd import local_changes, plan_chunks
from dist_sense.kmeans.mcl import mcl_cluster_counts, senses_from_mcl
from dist_sense.kmeans.start import plusplus_job, reseed_empty, share_tokens
from dist_sense.kmeans.subsample import Subsample, gather_subsample
from dist_sense.kmeans.tile import cluster_tile, make_local_tile, with_distinct_senses
from dist_sense.kmeans.types import ONE_PROCESS

D = 16


@pytest.fixture(autouse=True)
def one_blas_thread():
    """2 shared cores: spinning BLAS threads only slow the small GEMMs down."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def mixture():
    """50 tokens, each a mixture of 3-8 well-separated Gaussians, 100-300 vectors."""
    rng = np.random.default_rng(0)
    tokens = []
    for _ in range(50):
        k = int(rng.integers(3, 9))
        centres = rng.normal(0, 10, (k, D))
        labels = np.arange(int(rng.integers(100, 301))) % k  # every cluster populated
        tokens.append((centres[labels] + rng.normal(0, 1, (len(labels), D)), labels, k))
    vectors = np.concatenate([t[0] for t in tokens]).astype(np.float32)
    slots = np.concatenate([np.full(len(t[0]), i) for i, t in enumerate(tokens)])
    priority = rng.integers(0, 2**63, len(slots), dtype=np.uint64)
    return tokens, vectors, slots, priority, np.array([t[2] for t in tokens])


def config(**kw):
    settings = dict(subsample=300, max_iter=100, tol=1e-6)
    settings.update(kw)
    return KMeansConfig(**settings)


def per_token_inertia(local, result):
    return np.bincount(local.slots, weights=result.distances, minlength=local.n_tokens)


def kmeans_plusplus(sub, k, rng, xp, comm=ONE_PROCESS):
    """(centres, valid): k-means++ of every token of `sub`, each rank of `comm` seeding its share."""
    (result,) = share_tokens([plusplus_job(sub, k, rng, xp)], comm, xp)
    return result


def test_recovers_true_centres(mixture):
    tokens, vectors, slots, priority, ks = mixture
    local, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    centres, valid, counts = cluster_tile(local, config(), xp=np, k=ks).dense()
    assert (valid.sum(axis=1) == ks).all()
    for t, (x, labels, k) in enumerate(tokens):
        means = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
        found = centres[t, :k]
        assert np.abs(means[:, None] - found[None]).max(-1).min(1).max() < 1e-3, f"token {t}"
        assert sorted(counts[t, :k]) == sorted(np.bincount(labels))


def test_inertia_close_to_sklearn(mixture):
    from sklearn.cluster import KMeans

    tokens, vectors, slots, priority, ks = mixture
    local, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    ours = per_token_inertia(local, cluster_tile(local, config(), xp=np, k=ks))
    theirs = np.array([
        KMeans(k, init="k-means++", n_init=1, random_state=t).fit(x.astype(np.float32)).inertia_
        for t, (x, _, k) in enumerate(tokens)
    ])
    ratio = ours.mean() / theirs.mean()
    print(f"mean inertia ratio vs scikit-learn: {ratio:.6f}")
    assert ratio <= 1.02


def test_tiny_chunks_give_the_same_result(mixture, monkeypatch):
    tokens, vectors, slots, priority, ks = mixture
    local, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    whole_centres, _, whole_counts = cluster_tile(local, config(), xp=np, k=ks).dense()
    monkeypatch.setattr(kmeans_lloyd, "CHUNK_ELEMENTS", 300 * D)  # one or two tokens per chunk
    assert len(plan_chunks(local.offsets, D, np)) > 20
    chunked_centres, _, chunked_counts = cluster_tile(local, config(), xp=np, k=ks).dense()
    np.testing.assert_allclose(chunked_centres, whole_centres, atol=1e-5)
    np.testing.assert_array_equal(chunked_counts, whole_counts)


def clustered_token(rng, n_clusters, per_cluster, spread=0.01):
    centres = rng.normal(0, 10, (n_clusters, D))
    return (centres[:, None] + rng.normal(0, spread, (n_clusters, per_cluster, D))).reshape(-1, D)


def test_mcl_k_rule():
    assert senses_from_mcl([0, 30, 59, 60, 899, 900, 901, 1000]).tolist() == [5, 5, 5, 6, 89, 90, 360, 400]
    rng = np.random.default_rng(1)
    groups = [clustered_token(rng, 7, 10), clustered_token(rng, 60, 3)]
    vectors = np.concatenate(groups).astype(np.float32)
    slots = np.repeat([0, 1], [len(g) for g in groups])
    local, _ = make_local_tile(vectors, slots, rng.integers(0, 2**63, len(slots), dtype=np.uint64), 2, np)
    sub = gather_subsample(local, np.array([1000, 1000]), ONE_PROCESS, np)
    assert mcl_cluster_counts(sub, 2, 1.65, 30, np).tolist() == [7, 60]
    result = cluster_tile(local, config(k_policy="mcl"), xp=np)
    assert result.mcl_clusters.tolist() == [7, 60]
    assert result.dense()[1].sum(axis=1).tolist() == [5, 6]


def test_tokens_with_few_vectors_keep_their_distinct_vectors():
    a, b, c = (np.full(D, v, dtype=np.float32) for v in (1.0, 2.0, 3.0))
    rng = np.random.default_rng(2)
    many = rng.normal(0, 1, (40, D)).astype(np.float32)
    vectors = np.stack([a, b, a, a, b, c] + list(many))
    slots = np.array([0, 0, 0, 1, 1, 1] + [2] * 40)  # 3 vectors (2 distinct), 3 distinct, 40
    local, _ = make_local_tile(vectors, slots, rng.integers(0, 2**63, len(slots), dtype=np.uint64), 3, np)
    result = cluster_tile(local, config(k=3), xp=np)
    assert result.kept_as_vectors.tolist() == [True, True, False]
    centres, valid, counts = result.dense()
    assert valid.sum(axis=1).tolist() == [2, 3, 3]
    np.testing.assert_array_equal(centres[0, :2], [a, b])  # most frequent first
    assert counts[0, :2].tolist() == [2, 1] and counts[1].tolist() == [1, 1, 1]
    assert {tuple(c) for c in centres[1]} == {tuple(a), tuple(b), tuple(c)}


def test_spherical_centres_are_unit(mixture):
    tokens, vectors, slots, priority, ks = mixture
    local, _ = make_local_tile(vectors * 7, slots, priority, len(tokens), np, spherical=True)
    centres, valid, _ = cluster_tile(local, config(spherical=True, k=4), xp=np).dense()
    norms = np.linalg.norm(centres[valid], axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-5)


def test_seeding_in_cache_sized_blocks_gives_the_same_start(mixture, monkeypatch):
    from dist_sense.kmeans import start as kmeans_start

    tokens, vectors, slots, priority, ks = mixture
    whole, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    sub = gather_subsample(whole, np.full(len(tokens), 300), ONE_PROCESS, np)
    monkeypatch.setattr(kmeans_start, "SEED_BLOCK_ELEMENTS", 1 << 40)
    at_once = kmeans_plusplus(sub, np.full(len(tokens), 5), np.random.default_rng(0), np)
    monkeypatch.setattr(kmeans_start, "SEED_BLOCK_ELEMENTS", 300 * D)  # one token per block
    blocked = kmeans_plusplus(sub, np.full(len(tokens), 5), np.random.default_rng(0), np)
    for a, b in zip(at_once, blocked):
        np.testing.assert_array_equal(a, b)


def test_cutting_stopped_tokens_out_of_chunks_changes_no_sense(mixture, monkeypatch):
    """Stopped tokens leave their chunks between re-plannings (prune_chunks); the senses are those of keeping them."""
    tokens, vectors, slots, priority, ks = mixture
    local, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    monkeypatch.setattr(kmeans_lloyd, "CHUNK_ELEMENTS", 300 * D)  # several tokens per chunk, many chunks
    prune, cuts = kmeans_lloyd.prune_chunks, []

    def counting(chunks, moving, xp):
        pruned = prune(chunks, moving, xp)
        cuts.append(sum(all(c is not old for old in chunks) for c in pruned))
        return pruned

    monkeypatch.setattr(kmeans_lloyd, "prune_chunks", counting)
    cut = cluster_tile(local, config(), xp=np)
    assert sum(cuts) > 0, "no chunk was cut: the test shows nothing"
    monkeypatch.setattr(kmeans_lloyd, "prune_chunks", lambda chunks, moving, xp: chunks)  # never cut
    whole = cluster_tile(local, config(), xp=np)
    np.testing.assert_allclose(cut.dense()[0], whole.dense()[0], atol=1e-5)
    np.testing.assert_array_equal(cut.dense()[2], whole.dense()[2])
    assert cut.inertia == pytest.approx(whole.inertia, rel=1e-6)


def test_prune_keeps_moving_tokens_and_leaves_the_given_chunks_alone(mixture, monkeypatch):
    tokens, vectors, slots, priority, ks = mixture
    local, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    monkeypatch.setattr(kmeans_lloyd, "CHUNK_ELEMENTS", 300 * D)
    chunks = plan_chunks(local.offsets, D, np)
    for chunk in chunks:
        chunk.x, chunk.sq = local.vectors[chunk.rows], local.sq_norms[chunk.rows]
    before = [chunk.index.copy() for chunk in chunks]
    moving = np.arange(len(tokens)) % 3 == 0
    pruned = kmeans_lloyd.prune_chunks(chunks, moving, np)
    assert [c.index.tolist() for c in chunks] == [b.tolist() for b in before]
    kept = np.concatenate([c.index for c in pruned])
    assert set(np.flatnonzero(moving)) <= set(kept.tolist())
    for chunk in pruned:
        np.testing.assert_array_equal(chunk.x, local.vectors[chunk.rows])
        assert moving[chunk.index].any()


def test_changes_of_halves_sum_to_the_whole(mixture, monkeypatch):
    """What each half of the rows changes in the per-sense sums and counts adds up to what all rows change, in the
    first iteration (every row is new) and after the centres move (a few rows change sense, some leave one)."""
    tokens, vectors, slots, priority, ks = mixture
    whole, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    sub = gather_subsample(whole, np.full(len(tokens), 300), ONE_PROCESS, np)
    centres, valid = kmeans_plusplus(sub, np.full(len(tokens), 5), np.random.default_rng(0), np)
    moved = centres + np.random.default_rng(1).normal(0, 0.3, centres.shape).astype(np.float32)
    halves = [np.arange(len(slots)) % 2 == r for r in (0, 1)]
    parts = [make_local_tile(vectors[h], slots[h], priority[h], len(tokens), np)[0] for h in halves]
    n_pos, k_max = valid.shape

    def dense(changes):
        out = np.zeros((n_pos * k_max, D))
        out[changes.keys] = changes.sums
        return out

    labels = [np.full(len(p.slots), -1, dtype=np.int64) for p in [whole] + parts]
    total_sums, total_counts = np.zeros((n_pos * k_max, D)), np.zeros(n_pos * k_max)
    for step, (at, dense_share) in enumerate([(centres, 0.2), (moved, 0.2), (centres, 1.0)]):
        monkeypatch.setattr(kmeans_lloyd, "DENSE_SHARE", dense_share)  # the last: row by row whatever moved
        changes = [local_changes(p, plan_chunks(p.offsets, D, np), at, valid, lab, np)
                   for p, lab in zip([whole] + parts, labels)]
        np.testing.assert_array_equal(changes[1].counts + changes[2].counts, changes[0].counts)
        np.testing.assert_allclose(dense(changes[1]) + dense(changes[2]), dense(changes[0]), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(changes[1].inertia + changes[2].inertia, changes[0].inertia, rtol=1e-5)
        if step == 0:
            assert changes[0].counts.sum() == len(slots)  # every row joins a sense
        else:
            assert len(changes[0].keys) > 0 and changes[0].counts.sum() == 0  # rows only moved between senses
        total_sums += dense(changes[0])
        total_counts += changes[0].counts
    # The changes, added up, are the sums and counts of the rows' senses now.
    flat = np.repeat(np.arange(n_pos), np.diff(whole.offsets)) * k_max + labels[0]
    np.testing.assert_array_equal(total_counts, np.bincount(flat, minlength=n_pos * k_max))
    direct = np.zeros((n_pos * k_max, D))
    np.add.at(direct, flat, whole.vectors.astype(np.float64))
    np.testing.assert_allclose(total_sums, direct, rtol=1e-5, atol=1e-3)


class ThreadRanks:
    """Collectives between threads: a stand-in for MPI that runs in one process; comm(rank) is a rank's Comm."""

    def __init__(self, n: int):
        self.world = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.inbox = [None] * n

    def exchange(self, rank: int, array):
        self.inbox[rank] = np.array(array, copy=True)
        self.barrier.wait()
        parts = list(self.inbox)
        self.barrier.wait()
        return parts

    def comm(self, rank: int) -> "ThreadComm":
        return ThreadComm(self, rank)


class ThreadComm:
    """One thread-rank's side of ThreadRanks, with the Comm interface of the k-means (rank, world, allreduce,
    allgather)."""

    def __init__(self, ranks: ThreadRanks, rank: int):
        self.ranks, self.rank, self.world = ranks, rank, ranks.world

    def allreduce(self, array):
        return functools.reduce(np.add, self.ranks.exchange(self.rank, array))

    def allgather(self, array):
        return np.concatenate(self.ranks.exchange(self.rank, array))


def on_two_ranks(owner, vectors, slots, priority, n_tokens, step):
    """step(local tile, comm) on two thread-ranks, rank 0 holding the rows where `owner` is set; both results."""
    ranks = ThreadRanks(2)

    def run_rank(rank):
        mine = owner if rank == 0 else ~owner
        local, _ = make_local_tile(vectors[mine], slots[mine], priority[mine], n_tokens, np)
        return step(local, ranks.comm(rank))

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(run_rank, [0, 1]))


def test_two_ranks_equal_one(mixture):
    """Rows split unevenly over two thread-ranks give the single-process senses."""
    tokens, vectors, slots, priority, ks = mixture
    cfg = config(k=6, subsample=50, tol=1e-4)
    single_local, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    single = cluster_tile(single_local, cfg, xp=np, seed=3)
    single_centres, single_valid, single_counts = single.dense()
    owner = np.random.default_rng(5).random(len(slots)) < 0.3
    results = on_two_ranks(owner, vectors, slots, priority, len(tokens),
                           lambda local, comm: cluster_tile(local, cfg, comm, np, seed=3))
    for result in results:
        centres, valid, counts = result.dense()
        np.testing.assert_array_equal(valid, single_valid)
        np.testing.assert_array_equal(counts, single_counts)
        np.testing.assert_allclose(centres, single_centres, atol=1e-4)
        assert len(result.history) == len(single.history)
        assert result.inertia == pytest.approx(single.inertia, rel=1e-6)


def test_subsample_does_not_depend_on_the_split(mixture):
    tokens, vectors, slots, priority, ks = mixture
    cap = np.full(len(tokens), 40)
    whole, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    expected = gather_subsample(whole, cap, ONE_PROCESS, np)
    assert (expected.counts == 40).all()
    owner = np.arange(len(slots)) % 3 == 0
    for sub in on_two_ranks(owner, vectors, slots, priority, len(tokens),
                            lambda local, comm: gather_subsample(local, cap, comm, np)):
        np.testing.assert_array_equal(sub.points, expected.points)
        np.testing.assert_array_equal(sub.mask, expected.mask)


def test_empty_sense_is_reseeded_to_the_farthest_point():
    points = np.array([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    sub = Subsample(points, np.array([[True, True, True, False]]), np.array([3]))
    centres = np.array([[[0.5, 0.0], [100.0, 100.0]]], dtype=np.float32)
    valid = np.array([[True, True]])
    empty = np.array([[False, True]])
    moved, still_valid, count = reseed_empty(sub, centres, valid, empty, np)
    assert count == 1 and still_valid.all()
    np.testing.assert_array_equal(moved[0, 1], [10.0, 0.0])
    np.testing.assert_array_equal(moved[0, 0], [0.5, 0.0])


def test_duplicate_points_give_fewer_senses_not_empty_ones():
    vectors = np.repeat(np.eye(D, dtype=np.float32)[:2], 20, axis=0)  # 40 vectors, 2 distinct
    local, _ = make_local_tile(vectors, np.zeros(40), np.arange(40, dtype=np.uint64), 1, np)
    result = cluster_tile(local, config(k=5), xp=np)
    _, valid, counts = result.dense()
    assert valid.sum() == 2 and counts[0, :2].tolist() == [20, 20]
    assert result.inertia == 0


def test_kmeans_plusplus_split_over_ranks_equals_one_rank(mixture):
    """Each of 3 ranks seeds every 3rd token; after the allgather all hold the one-rank start."""
    tokens, vectors, slots, priority, ks = mixture
    whole, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    sub = gather_subsample(whole, np.full(len(tokens), 300), ONE_PROCESS, np)
    k = np.asarray(ks)
    single = kmeans_plusplus(sub, k, np.random.default_rng(7), np)
    world, ranks, results = 3, ThreadRanks(3), {}

    def run(rank):
        results[rank] = kmeans_plusplus(sub, k, np.random.default_rng(7), np, ranks.comm(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(world):
        np.testing.assert_array_equal(results[rank][0], single[0])
        np.testing.assert_array_equal(results[rank][1], single[1])


def test_share_tokens_packs_several_jobs_into_one_allgather():
    """Jobs of different shapes and dtypes (one with fewer tokens than ranks) come back whole on every rank."""
    def job(n, width):
        return n, lambda index: (np.arange(n * width, dtype=np.float32).reshape(n, width)[index],
                                 (np.arange(n) % 3 == 0)[index], np.arange(n, dtype=np.int64)[index] * 7)

    jobs = [job(7, 3), job(2, 5), job(0, 1), job(4, 1)]
    expected = share_tokens(jobs, ONE_PROCESS, np)
    ranks, calls = ThreadRanks(3), [0, 0, 0]

    class Counting(ThreadComm):
        def allgather(self, array):
            calls[self.rank] += 1
            return super().allgather(array)

    def run(rank):
        return share_tokens(jobs, Counting(ranks, rank), np)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    assert calls == [1, 1, 1]
    for result in results:
        for got, want in zip(result, expected):
            for a, b in zip(got, want):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_stay_in_the_heap_after_allocator_tuning():
    import ctypes

    from dist_sense.runtime.process import retain_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    assert retain_freed_memory()
    block = np.ones(100 << 20, dtype=np.uint8)  # 100 MiB: mmapped and unmapped on free without the tuning
    del block
    assert libc.mallinfo2().fordblks >= 100 << 20  # freed, but kept by the heap for the next tile


def test_distinct_senses_counts_repeats_most_frequent_first_whatever_the_row_order():
    a, b, c = (np.full(D, v, dtype=np.float32) for v in (1.0, 2.0, 3.0))
    slots = np.array([0, 0, 0, 0, 1, 1, 1])
    points = np.stack([b, a, b, c, a, a, c])  # slot 0: b twice, a, c; slot 1: a twice, c
    senses = distinct_senses(slots, points)
    assert senses.slots.tolist() == [0, 0, 0, 1, 1]
    assert senses.counts.tolist() == [2, 1, 1, 2, 1]
    np.testing.assert_array_equal(senses.points[0], b)
    np.testing.assert_array_equal(senses.points[3], a)
    starts = np.array([0, 3])  # each row's sense is row_sense within its slot's senses
    np.testing.assert_array_equal(senses.points[starts[slots] + senses.row_sense], points)
    shuffled = np.random.default_rng(3).permutation(len(slots))
    again = distinct_senses(slots[shuffled], points[shuffled])
    np.testing.assert_array_equal(again.points, senses.points)
    np.testing.assert_array_equal(again.counts, senses.counts)
    np.testing.assert_array_equal(senses_of_rows(senses, slots, points), senses.row_sense)


def test_senses_of_rows_matches_rows_whose_hashes_collide(monkeypatch):
    """Every row hashing alike still finds its own vector (the exact comparison decides)."""
    rng = np.random.default_rng(4)
    points = rng.normal(0, 1, (6, D)).astype(np.float32)
    slots = np.array([0, 0, 0, 1, 1, 1])
    monkeypatch.setattr(kmeans_distinct, "row_hash", lambda rows: np.zeros(len(rows), dtype=np.uint64))
    senses = distinct_senses(slots, points)
    assert len(senses.points) == 6 and (senses.counts == 1).all()
    found = senses_of_rows(senses, slots, points)
    starts = np.array([0, 3])
    np.testing.assert_array_equal(senses.points[starts[slots] + found], points)


def test_small_tokens_left_to_the_writer_give_the_same_senses():
    """keep_small=False leaves the tokens with no more vectors than k unlabelled; adding their distinct
    vectors afterwards (what build_dict's writer does) gives what keep_small=True gives."""
    rng = np.random.default_rng(5)
    few = np.repeat(rng.normal(0, 1, (2, D)).astype(np.float32), [2, 1], axis=0)  # 3 vectors, 2 distinct
    many = rng.normal(0, 1, (50, D)).astype(np.float32)
    vectors = np.concatenate([few, many, few[:1]])
    slots = np.array([0, 0, 0] + [1] * 50 + [2])
    priority = rng.integers(0, 2**63, len(slots), dtype=np.uint64)
    local, _ = make_local_tile(vectors, slots, priority, 3, np)
    kept = cluster_tile(local, config(k=4), xp=np)
    left = cluster_tile(local, config(k=4), xp=np, keep_small=False)
    assert left.kept_as_vectors.tolist() == [True, False, True] and left.slots.tolist() == [1]
    assert (left.labels[local.slots != 1] == -1).all() and (left.labels[local.slots == 1] >= 0).all()
    small = local.slots != 1
    finished = with_distinct_senses(left, distinct_senses(local.slots[small], local.vectors[small]))
    for field in ("slots", "offsets", "centroids", "sense_counts"):
        np.testing.assert_array_equal(getattr(finished, field), getattr(kept, field), err_msg=field)
    assert kept.sense_counts[:2].tolist() == [2, 1] and kept.senses_per_token.tolist() == [2, 4, 1]


def test_writers_take_the_largest_held_tiles_first_and_stay_balanced():
    from types import SimpleNamespace

    from dist_sense.comm import LocalComm
    from dist_sense.stages.build_dict.finish import TileFinisher

    finisher = TileFinisher(LocalComm(rank=0, world=2), None, None, "", 1, 1 << 30)
    finisher.held = [SimpleNamespace(tile=t, held_bytes=size) for t, size in enumerate([100, 10, 10, 60, 50])]
    writer = finisher.assign_writers()
    # 100 to rank 0; 60 and 50 to rank 1 (less written each time); the 10s then to rank 0 (a tie goes to the lower)
    assert writer.tolist() == [0, 0, 0, 1, 1]
    assert finisher.written_bytes.tolist() == [120, 110]
    finisher.held = [SimpleNamespace(tile=5, held_bytes=30)]  # the next batch continues from those totals
    assert finisher.assign_writers().tolist() == [1]


def test_assignment_distances_do_not_depend_on_the_rows_around_them(mixture, monkeypatch):
    """A row's distance to its sense is the same to the bit whichever rows share its rank and chunk (one batched
    product of another shape can differ in the last bit), and it is ||x - c||^2."""
    from dist_sense.kmeans.lloyd import assign_senses

    tokens, vectors, slots, priority, ks = mixture
    whole, _ = make_local_tile(vectors, slots, priority, len(tokens), np)
    sub = gather_subsample(whole, np.full(len(tokens), 300), ONE_PROCESS, np)
    centres, valid = kmeans_plusplus(sub, np.full(len(tokens), 5), np.random.default_rng(0), np)
    labels, distances = assign_senses(whole, plan_chunks(whole.offsets, D, np), centres, valid, np)
    mine = np.random.default_rng(1).random(len(slots)) < 0.3
    first = np.r_[True, slots[1:] != slots[:-1]]
    mine[slots < 10] = first[slots < 10]  # tokens 0-9: one row on this rank, a product of one row
    part, _ = make_local_tile(vectors[mine], slots[mine], priority[mine], len(tokens), np)
    monkeypatch.setattr(kmeans_lloyd, "CHUNK_ELEMENTS", 40 * D)  # other chunks, other batch shapes
    part_labels, part_distances = assign_senses(part, plan_chunks(part.offsets, D, np), centres, valid, np)
    at = np.searchsorted(whole.priority, part.priority, sorter=np.argsort(whole.priority))
    at = np.argsort(whole.priority)[at]  # each of the part's rows in the whole tile
    same = part_labels == labels[at]
    assert same.mean() > 0.99
    np.testing.assert_array_equal(part_distances[same], distances[at][same])
    direct = ((whole.vectors.astype(np.float64) - centres[whole.slots, labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(distances, direct, rtol=1e-5, atol=1e-6)


def test_inertia_is_summed_exactly_whatever_the_split():
    import math

    from dist_sense.kmeans.exact import exact_sum_parts, exact_total

    rng = np.random.default_rng(0)
    values = rng.lognormal(0, 8, 20_000).astype(np.float32)
    values[:3] = [0, np.float32(1e-45), np.float32(3e38)]  # zero, the smallest subnormal, near the largest
    whole = exact_total(exact_sum_parts(values))
    assert whole == math.fsum(values.astype(np.float64).tolist())
    for ranks in (2, 3, 7):
        parts = sum(exact_sum_parts(part) for part in np.array_split(rng.permutation(values), ranks))
        assert exact_total(parts) == whole


@pytest.mark.parametrize("spherical", [False, True])
def test_updating_only_the_changed_senses_gives_every_sense_its_mean(spherical):
    """update.update_changed_centres touches only the senses whose sums or counts changed; every centre then
    equals what dividing all of them again gives, and senses nothing is nearest to keep their place."""
    from dist_sense.kmeans.update import update_changed_centres

    rng = np.random.default_rng(3)
    n_tokens, k = 6, 5
    sums = rng.standard_normal((n_tokens, k, D))
    counts = rng.integers(0, 4, (n_tokens, k)).astype(np.float64)
    valid = np.ones((n_tokens, k), dtype=bool)
    start = rng.standard_normal((n_tokens, k, D)).astype(np.float32)

    def all_means(sums, counts, before):
        if spherical:
            mean = sums / np.maximum(np.linalg.norm(sums, axis=2, keepdims=True), 1e-12)
        else:
            mean = sums / np.maximum(counts, 1)[:, :, None]
        return np.where((counts > 0)[:, :, None], mean.astype(np.float32), before)

    everything = np.indices((n_tokens, k)).reshape(2, -1)
    points = start.copy()
    update_changed_centres(points, valid, sums, counts, everything[0], everything[1], spherical, np)
    np.testing.assert_array_equal(points, all_means(sums, counts, start))
    # Some senses gain or lose rows (one loses all of them); only those are passed.
    rows, senses = np.array([0, 2, 2, 5]), np.array([1, 0, 4, 3])
    sums[rows, senses] += rng.standard_normal((4, D))
    counts[rows, senses] += np.array([1, 2, -counts[2, 4], 1])
    before = points.copy()
    moves = update_changed_centres(points, valid, sums, counts, rows, senses, spherical, np)
    np.testing.assert_array_equal(points, all_means(sums, counts, before))
    assert counts[2, 4] == 0 and np.array_equal(points[2, 4], before[2, 4]) and moves[2] == 0
    np.testing.assert_allclose(moves, ((before[rows, senses] - points[rows, senses]) ** 2).sum(axis=1), rtol=1e-6)
    untouched = np.ones((n_tokens, k), dtype=bool)
    untouched[rows, senses] = False
    np.testing.assert_array_equal(points[untouched], before[untouched])


# ----------------------------------------------------------------------------- MCL at the reference's scale


def test_mcl_counts_equal_the_markov_clustering_package():
    """Our batched MCL finds as many clusters as the reference's library on the same affinities
    (1/(euclidean + 0.01), self-loops 1, expansion 2, inflation 1.65, 100 iterations)."""
    mc = pytest.importorskip("markov_clustering", reason="markov-clustering (a test requirement) is not installed")
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(7)
    tokens = [clustered_token(rng, n, per, spread) for n, per, spread in
              [(4, 6, 0.5), (9, 3, 2.0), (2, 20, 4.0), (12, 2, 1.0)]] + [rng.normal(0, 1, (25, D))]
    vectors = np.concatenate(tokens).astype(np.float32)
    slots = np.repeat(np.arange(len(tokens)), [len(t) for t in tokens])
    local, _ = make_local_tile(vectors, slots, rng.integers(0, 2**63, len(slots), dtype=np.uint64), len(tokens), np)
    sub = gather_subsample(local, np.full(len(tokens), 1000), ONE_PROCESS, np)
    ours = mcl_cluster_counts(sub, 2, 1.65, 100, np)
    theirs = []
    for points in tokens:
        affinity = 1.0 / (cdist(points.astype(np.float32), points.astype(np.float32)) + 0.01)
        result = mc.run_mcl(affinity, expansion=2, inflation=1.65, iterations=100)
        theirs.append(len(mc.get_clusters(result)))
    assert ours.tolist() == theirs
    assert len(set(theirs)) > 2, "the cases should not all give one count"


def big_token_tile(rng, n_clusters, per_cluster):
    vectors = clustered_token(rng, n_clusters, per_cluster, spread=0.01) * 10
    small = rng.normal(0, 1, (3, D))  # a token with fewer than 5 vectors: left out of MCL
    allv = np.concatenate([vectors, small]).astype(np.float32)
    slots = np.repeat([0, 1], [len(vectors), len(small)])
    return allv, slots, rng.integers(0, 2**63, len(slots), dtype=np.uint64)


@pytest.mark.parametrize("n_clusters, per_cluster, k", [(300, 3, 30), (950, 1, 380)])
def test_mcl_sees_every_vector_so_k_follows_the_rule_beyond_256_clusters(n_clusters, per_cluster, k):
    """With kmeans.subsample=256 vectors MCL could find at most 256 clusters; it now clusters every sampled
    vector (up to kmeans.mcl_vectors), so 300 clusters give k = 30 and 950 give the 0.4 n branch."""
    vectors, slots, priority = big_token_tile(np.random.default_rng(8), n_clusters, per_cluster)
    local, _ = make_local_tile(vectors, slots, priority, 2, np)
    result = cluster_tile(local, config(k_policy="mcl", subsample=256, max_iter=5), xp=np)
    assert result.mcl_clusters.tolist() == [n_clusters, 0]
    assert np.diff(result.offsets).tolist() == [k, 3]  # the small token keeps its 3 vectors
    capped = cluster_tile(local, config(k_policy="mcl", mcl_vectors=256, max_iter=5), xp=np)
    assert capped.mcl_clusters[0] <= 256


def test_mcl_senses_are_the_same_on_one_and_two_ranks():
    rng = np.random.default_rng(9)
    tokens = [clustered_token(rng, n, 4, 0.05) for n in (3, 8, 15, 40, 70)]
    vectors = np.concatenate(tokens).astype(np.float32)
    slots = np.repeat(np.arange(len(tokens)), [len(t) for t in tokens])
    priority = rng.integers(0, 2**63, len(slots), dtype=np.uint64)
    cfg = config(k_policy="mcl")
    single = cluster_tile(make_local_tile(vectors, slots, priority, len(tokens), np)[0], cfg, xp=np)
    owner = rng.random(len(slots)) < 0.4
    results = on_two_ranks(owner, vectors, slots, priority, len(tokens),
                           lambda local, comm: cluster_tile(local, cfg, comm, np))
    assert single.mcl_clusters.tolist() == [3, 8, 15, 40, 70]
    for result in results:
        np.testing.assert_array_equal(result.mcl_clusters, single.mcl_clusters)
        np.testing.assert_array_equal(result.offsets, single.offsets)
        np.testing.assert_allclose(result.centroids, single.centroids, atol=1e-4)
