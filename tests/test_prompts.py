from datasetdm.config import PromptsConfig, WorldConfig
from datasetdm.prompts import expand_prompts

WORLD = WorldConfig(classes=("circle", "square", "star"), colours=("red", "blue"))


def test_deterministic_and_deduplicated():
    cfg = PromptsConfig(num_prompts=20, max_objects=2, seed=3)
    a, b = expand_prompts(WORLD, cfg), expand_prompts(WORLD, cfg)
    assert a == b
    prompts = [r["prompt"] for r in a]
    assert len(prompts) == 20 == len(set(prompts))


def test_all_layouts_when_fewer_exist_than_asked():
    # 6 (shape, colour) pairs: 6 singles + 21 pairs = 27 distinct layouts.
    records = expand_prompts(WORLD, PromptsConfig(num_prompts=1000, max_objects=2))
    assert len(records) == 27


def test_balanced_over_object_counts_and_only_world_words():
    records = expand_prompts(WORLD, PromptsConfig(num_prompts=12, max_objects=2))
    counts = [len(r["layout"]) for r in records]
    assert counts.count(1) == counts.count(2) == 6
    for r in records:
        for shape, colour in r["layout"]:
            assert shape in WORLD.classes and colour in WORLD.colours


def test_templates_wrap_the_caption():
    records = expand_prompts(
        WORLD, PromptsConfig(num_prompts=4, max_objects=1, templates=("{objects}", "and {objects}"))
    )
    assert any(r["prompt"].startswith("and ") for r in records)
