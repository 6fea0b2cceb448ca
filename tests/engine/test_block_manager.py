"""The KV block manager alone: page allocation, and prefix caching (blocks shared by content,
never across adapters, evicted least recently freed first)."""

from __future__ import annotations

from cara_jax.engine.block_manager import BlockManager, extend_block_hashes


def test_block_manager():
    bm = BlockManager(num_pages=5, block_size=4)  # 4 usable pages
    assert bm.grow("a", 5) and bm.table("a") and len(bm.table("a")) == 2
    assert 0 not in bm.table("a")
    assert bm.fits("b", 100) == 8 and bm.grow("b", 8) and bm.num_free == 0
    assert not bm.grow("c", 1) and bm.table("c") == []
    assert bm.grow("a", 8)  # still within its two pages
    bm.free("a")
    assert bm.num_free == 2 and bm.grow("c", 1)


def test_block_manager_shares_evicts_lru_and_never_crosses_keys():
    bm = BlockManager(num_pages=7, block_size=4)  # 6 usable pages
    toks = list(range(10, 22))  # 3 full blocks
    ha = extend_block_hashes([], toks, 4, "adapter-a")
    hb = extend_block_hashes([], toks, 4, "adapter-b")
    assert len(ha) == 3 and not set(ha) & set(hb)
    assert extend_block_hashes(ha[:1], toks, 4, "adapter-a") == ha  # extends in place
    assert bm.match("s1", ha) == 0 and bm.grow("s1", 12)
    bm.commit("s1", ha, 3)
    assert bm.num_cached == 3
    assert bm.match("s2", ha[:2]) == 8  # shares two pages while s1 runs
    assert bm.table("s2") == bm.table("s1")[:2] and bm.num_free == 3
    assert bm.match("s3", hb) == 0  # other adapter content: nothing
    bm.free("s1")
    bm.free("s2")
    assert bm.num_free == 6 and bm.num_cached == 3  # free, still cached
    # taking pages evicts unregistered ones first, then the least recently freed: s1's last block
    assert bm.grow("x", 4 * 4)
    assert bm.num_cached == 2 and bm.stats.evictions == 1
    assert bm.match("s4", ha) == 8  # the first two blocks survived
    bm.free("s4")
    bm.free("x")
    assert bm.reset_cache() == 2 and bm.num_cached == 0 and bm.num_free == 6
