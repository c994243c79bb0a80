"""`litpipe run` end to end on a slice of the real demo data, as LiT's ablation (`litpipe ablation`):
precompute -> train -> eval on the locked pretrained tower (L), on the same architecture at random
init (u), and on L with shuffled captions, the control that must stay at chance (nothing of the true
pairing leaks into training)."""

import json

import pytest

from litpipe.demo.ablation import run_ablation
from litpipe.demo.data import build_demo_data
from litpipe.demo.tower import CHECKPOINT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_data(root / "data", views=2, limit=300)
    return root


def overrides(root):
    data = root / "data"
    return [f"store.root={root / 'store'}", f"encoder.pretrained={data / CHECKPOINT}",
            f"data.train.urls={data}/train-*.tar", f"data.heldout.urls={data}/heldout-*.tar",
            f"data.heldout.classnames={data}/kinds.txt", "eval.retrieval=[train, heldout]", "eval.zeroshot=[]",
            "train.batch_size=128", "train.chunk_size=128", "train.epochs=10", "train.lr=0.003",
            "precompute.batch_size=64", "ray.num_cpus=2"]


@pytest.mark.long
def test_locked_pretrained_tower_beats_random_beats_control(demo, ray_local):
    results = run_ablation("pipeline.yaml", overrides(demo), demo / "ablation")
    rows = {(r["dataset"], r["metric"]): r for r in results["rows"]}
    # Held out (emoji no run trained on): only the pretrained tower's features carry over to new emoji.
    heldout = rows["heldout", "image_retrieval_recall@10"]
    assert heldout["L"] > 1.3 * heldout["u"] and heldout["L"] > 1.3 * heldout["chance"], heldout
    # On the training split, whose 500-odd images make chance a tight band, u fits its pairs (as LiT's u
    # does) while the control, which never sees a true pair, stays at chance.
    train = rows["train", "image_retrieval_recall@5"]
    assert train["u"] > 3 * train["chance"] > train["control"], train
    assert train["L"] > 3 * train["chance"], train
    assert json.loads((demo / "ablation" / "ablation.json").read_text())["rows"] == results["rows"]
    assert (demo / "ablation" / "ablation.png").stat().st_size > 0
