"""benchmarks.checkpoint's restore part on tiny-moe: a real checkpoint written and restored in fresh
processes -- the figures the issue asks for exist.  (Not with ``cold_restore``: dropping the page
cache would slow every other test running beside this one.)"""

from benchmarks import checkpoint


def test_quick_restore_figures():
    figures = checkpoint.run(quick=True, restore_only=True)
    assert figures["restore_model"] == "tiny-moe"
    assert figures["restore_s"] > 0 and figures["state_gb"] > 0
    # the checkpoint on disk holds the whole state, uncompressed (plus small JSON items)
    assert figures["checkpoint_on_disk_gb"] >= figures["state_gb"]
    assert figures["restore_page_cache"] == "warm (just written)"
