"""Axolotl's FSDP2 (``fsdp2_groups: axolotl``) on the referee: Axolotl 0.21's own ``fsdp2_prepare_model`` shards
the model in Axolotl's environment (its torch 2.14 and transformers 5.20.1), and mst-plan's re-simulation of
the step must match it event by event (ctest python_axolotl; elsewhere it skips, unless MST_REQUIRE_AXOLOTL=1
says that environment was meant to be there).
"""

import os
import random

import pytest

if os.environ.get("MST_REQUIRE_AXOLOTL") == "1":
    import axolotl  # noqa: F401
else:
    pytest.importorskip("axolotl")

from mst_referee import differential  # noqa: E402


@pytest.mark.parametrize("seed, tied, rank, dp", [(3, False, 0, 4), (8, True, 3, 5), (9, False, 1, 2), (11, False, 2, 3)])
def test_seeded_cases_in_axolotls_fsdp2_groups_run_through_its_own_sharding_and_compare(tmp_path, seed, tied, rank, dp,
                                                                                        mst_plan):
    # (bf16 weights under Axolotl's bf16: true policy, the root holding the embedding, final norm and LM head:
    # seed 3 untied, resharded after forward and gathered again as backward starts, a layer checkpointed, the
    # fused LM head in 2 chunks, two rows; 8 tied, two micro-steps synced in the last only, the tiled MLP in 7
    # chunks; 9 untied, two micro-steps each reduce-scattered (the second added into the sharded gradients); 11
    # untied, every group kept gathered from forward to backward, checkpoints offloaded)
    case = differential.random_axolotl_case(random.Random(seed), "llama")
    assert case.knobs["fsdp2_groups"] == "axolotl" and "precision" not in case.knobs
    assert (case.config["tie_word_embeddings"], case.rank, case.knobs["dp"]) == (tied, rank, dp)
    identical, detail = differential.run_case(case, tmp_path / f"fsdp2_axolotl_{seed}", mst_plan)
    assert identical, detail


def test_axolotl_cases_draw_bf16_weights_and_no_eager_attention():
    rng = random.Random(6)
    for i in range(60):
        case = differential.random_axolotl_case(rng, differential.FSDP2_FAMILIES[i % len(differential.FSDP2_FAMILIES)])
        assert case.knobs["fsdp2"] and case.knobs["fsdp2_groups"] == "axolotl"
        assert case.knobs.get("precision", "pure-bf16") == "pure-bf16"
        assert case.knobs.get("attention", "flash") != "eager"
