"""msrun worker: the MoE layer with expert parallelism in data-parallel mode, ep = 2 (PyNative) and ep = 4 (graph
mode) on 4 ranks.

Every rank routes its own tokens; its Experts keep E/ep experts and the dispatcher exchanges tokens across the
expert group (AllGather stand-in on CPU). Saves per rank: input, output, aux loss, input gradient, the gradients
of every weight, and those gradients after GradReducer (world mean for shared weights, expert-data-group mean for
experts), for tests/parallel/test_expert_parallel.py to compare with the single-process layer.
"""
import os
import sys

import numpy as np
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from ms_llm.config import ParallelConfig  # noqa: E402
from ms_llm.parallel import context  # noqa: E402
from ms_llm.parallel.data_parallel import GradReducer  # noqa: E402
from ms_llm.parallel.expert_exchange import make_expert_parallel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ep_case import LayerLoss, build_layer, rank_inputs  # noqa: E402


def main(out_dir, device="CPU"):
    ms.set_device(device)   # Ascend: the same layer exchanges tokens with HCCL AlltoAll (expert_exchange auto)
    world = int(os.environ["MS_WORKER_NUM"])
    # the exchange in both execution modes (PyNative compiles nothing, which also keeps the launch short)
    for ep, mode in ((2, ms.PYNATIVE_MODE), (4, ms.GRAPH_MODE)):
        ms.set_context(mode=mode)
        info = context.setup(ParallelConfig(mode="data_parallel", data_parallel=world, expert_parallel=ep))
        net = LayerLoss(build_layer())
        names = make_expert_parallel(net, info.expert_group, info.expert_exchange)
        x, w = rank_inputs(info.rank)
        params = net.trainable_params()
        (loss, y, aux), (gx, gp) = ms.value_and_grad(net, 0, params, has_aux=True)(Tensor(x), Tensor(w))
        out = {"x": x, "y": y.asnumpy(), "aux": aux.asnumpy(), "loss": loss.asnumpy(), "gx": gx.asnumpy(),
               "expert_names": np.array(sorted(names))}
        out.update({f"g/{p.name}": g.asnumpy() for p, g in zip(params, gp)})
        # the data-parallel step's reduction: shared weights over the world, experts over their data group
        reduced = GradReducer(params, info, names)(tuple(gp))
        out.update({f"r/{p.name}": g.asnumpy() for p, g in zip(params, reduced)})
        np.savez(os.path.join(out_dir, f"ep{ep}_rank{info.rank}.npz"), **out)
    context.reset()


if __name__ == "__main__":
    main(*sys.argv[1:])
