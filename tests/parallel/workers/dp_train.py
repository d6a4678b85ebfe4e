"""msrun worker: data-parallel training of a tiny GPT and a tiny MoE GPT (tests/parallel/test_data_parallel.py)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

from ms_llm.config import ParallelConfig  # noqa: E402
from ms_llm.parallel import context  # noqa: E402
from dp_case import KINDS, train  # noqa: E402


def main(out_dir):
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    info = context.setup(ParallelConfig(mode="data_parallel", data_parallel=int(os.environ["MS_WORKER_NUM"])))
    for kind in KINDS:
        _, weights, losses = train(kind, info)
        np.savez(os.path.join(out_dir, f"{kind}_rank{info.rank}.npz"), losses=np.array(losses),
                 **{f"w/{k}": v for k, v in weights.items()})


if __name__ == "__main__":
    main(sys.argv[1])
