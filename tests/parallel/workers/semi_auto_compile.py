"""Ascend dry run (MS_SIMULATION_LEVEL, RANK_SIZE=8, RANK_ID=0; needs CANN, no NPU): compile one semi-auto training
step of a tiny GPT with dp=2 x mp=4 so MindSpore writes its strategy file, and write the strategy ms_llm derives
from the model's logical axes beside it (tests/parallel/test_semi_auto_ascend.py compares them)."""
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig, ParallelConfig
from ms_llm.parallel import context
from ms_llm.parallel.prepare import prepare
from ms_llm.parallel.strategy import write_strategy_file

CFG = ModelConfig(arch="gpt", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                  max_position_embeddings=16, dropout=0.0, tie_word_embeddings=False)
PARALLEL = ParallelConfig(mode="semi_auto_parallel", data_parallel=2, model_parallel=4)


class LMLoss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids, labels):
        logits = self.model(ids)
        b, s, v = logits.shape
        return ops.cross_entropy(ops.reshape(logits, (b * s, v)), ops.reshape(labels, (b * s,)))


def main(out_dir):
    from ms_llm.models.gpt import GPTLMHeadModel
    ms.set_device("Ascend")
    ms.set_context(mode=ms.GRAPH_MODE)
    info = context.setup(PARALLEL, "Ascend", strategy_file=os.path.join(out_dir, "mindspore_strategy.ckpt"))
    model = GPTLMHeadModel(CFG)
    prepared = prepare(model, LMLoss(model), PARALLEL, info)
    step = nn.TrainOneStepCell(prepared.loss_net, nn.AdamWeightDecay(model.trainable_params(), 1e-3))
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    step(Tensor(ids), Tensor(ids))
    write_strategy_file(model, PARALLEL, os.path.join(out_dir, "ms_llm_strategy.ckpt"), table=prepared.table)


if __name__ == "__main__":
    main(sys.argv[1])
