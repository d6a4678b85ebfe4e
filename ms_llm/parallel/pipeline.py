"""Pipeline parallelism: balanced stage assignment over layers, and the micro-batch wrapper.

:func:`balance_stages` cuts a sequence of per-item costs (embedding, layers, head) into ``stages`` contiguous
stages minimising the most loaded stage; ties go to the most even split, then to lighter early stages (under 1F1B
the first stage holds the most in-flight micro-batches). :func:`assign_stages` sets ``cell.pipeline_stage`` on a
model's embeddings, blocks and head from that plan, and :func:`wrap_pipeline` wraps the loss cell in MindSpore's
``mindspore.parallel.nn.Pipeline`` (micro-batches; the stage-0 cells read the inputs, the last stage returns the
loss) and, when asked, ``MicroBatchInterleaved``. Running a pipeline needs Ascend; building one runs anywhere.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from mindspore import nn

from ..layers.block import unshare_graph


def balance_stages(costs: Sequence[float], stages: int) -> List[int]:
    """Stage of each item: contiguous, every stage non-empty, minimal max stage cost.

    Among partitions with that max: minimal sum of squared stage costs (the most even), then heavier late stages.
    """
    n = len(costs)
    if stages < 1:
        raise ValueError(f"pipeline_stages must be >= 1, got {stages}")
    if n < stages:
        raise ValueError(f"{n} layers cannot fill {stages} pipeline stages (each stage needs at least one layer)")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be non-negative, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def load(i, j):                      # cost of items i..j-1
        return prefix[j] - prefix[i]

    eps = 1e-9 * max(1.0, prefix[-1])
    inf = float("inf")
    # best[s][j] = (max load, sum of squares) of items 0..j-1 cut into s stages; cut[s][j] = start of stage s-1
    best = [[(inf, inf)] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):    # ascending start: on ties keep the earliest, i.e. the heaviest last stage
                prev = best[s - 1][i]
                if prev[0] == inf:
                    continue
                w = load(i, j)
                cand = (max(prev[0], w), prev[1] + w * w)
                cur = best[s][j]
                better = (cand[0] < cur[0] - eps or
                          (abs(cand[0] - cur[0]) <= eps and cand[1] < cur[1] - eps))
                if better:
                    best[s][j] = cand
                    cut[s][j] = i
    out = [0] * n
    j = n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        for t in range(i, j):
            out[t] = s - 1
        j = i
    return out


def stage_sizes(assignment: Sequence[int]) -> List[int]:
    """Items per stage of an assignment, e.g. [0, 0, 1] -> [2, 1]."""
    sizes = [0] * (max(assignment) + 1 if assignment else 0)
    for s in assignment:
        sizes[s] += 1
    return sizes


def find_blocks(model: nn.Cell) -> List[Tuple[str, nn.Cell]]:
    """(name, cell) of the model's residual blocks in execution order (encoder before decoder)."""
    from ..layers.block import TransformerBlock
    return [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, TransformerBlock)]


def plan_stages(model: nn.Cell, stages: int, embedding_cost: float = 0.0, head_cost: float = 0.0,
                block_costs: Optional[Sequence[float]] = None) -> dict:
    """{cell name: stage} covering every cell of ``model`` that holds computation outside the blocks.

    Blocks are balanced by :func:`balance_stages` (unit cost each unless ``block_costs``), the embedding cost
    counted with the first block and the head cost with the last. A cell outside the blocks runs on the stage of
    the last block before it in its container (final norms, heads), or, if none precedes it, of the first block
    after it (embeddings). A container of blocks runs its own ops on its first block's stage; the root (key ``""``)
    runs its own (output projection, loss) on the last stage.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no TransformerBlock to place in pipeline stages")
    costs = [float(c) for c in block_costs] if block_costs is not None else [1.0] * len(blocks)
    if len(costs) != len(blocks):
        raise ValueError(f"block_costs has {len(costs)} entries for {len(blocks)} blocks")
    costs[0] += float(embedding_cost)
    costs[-1] += float(head_cost)
    block_stage = dict(zip((name for name, _ in blocks), balance_stages(costs, stages)))
    plan = dict(block_stage)

    def blocks_under(name):
        return [s for b, s in block_stage.items() if b == name or b.startswith(name + ".")]

    def place(cell, prefix):
        children = [(f"{prefix}.{k}" if prefix else k, c) for k, c in cell.name_cells().items()]
        inside = [blocks_under(name) for name, _ in children]
        for i, (name, child) in enumerate(children):
            if name in block_stage:
                continue
            if inside[i]:
                plan[name] = inside[i][0]     # a container's own glue ops (embedding sums, masks) run early
                place(child, name)
                continue
            before = [st for st in inside[:i] if st]
            after = [st for st in inside[i + 1:] if st]
            plan[name] = before[-1][-1] if before else after[0][0]

    plan[""] = stages - 1                      # the root's own ops: the output projection / loss
    place(model, "")
    return plan


def assign_stages(model: nn.Cell, plan: dict) -> None:
    """Set ``pipeline_stage`` on the cells of ``plan`` (names as in ``model.cells_and_names()``).

    Layers built to share one parsed graph (``TransformerBlock`` without random ops) are parsed one by one again:
    the shared graph is the first layer's, and whether the stage of every other layer survives the front-end inline
    cannot be checked on CPU (pipelines need Ascend), so pipelined models keep the per-layer graphs.
    """
    cells = dict(model.cells_and_names())
    missing = [n for n in plan if n not in cells]
    if missing:
        raise ValueError(f"pipeline plan names cells the model does not have: {missing}")
    for cell in cells.values():
        unshare_graph(cell)
    for name, stage in plan.items():
        cells[name].pipeline_stage = int(stage)


class MeanOverMicroBatches(nn.Cell):
    """MindSpore's Pipeline sums the micro-batch losses; divide by their number so the loss (and its gradient)
    is the global-batch mean, as without pipelining."""

    def __init__(self, pipeline: nn.Cell, micro_batches: int):
        super().__init__(auto_prefix=False)
        self.pipeline = pipeline
        self.scale = 1.0 / micro_batches

    def construct(self, *inputs):
        return self.pipeline(*inputs) * self.scale


def wrap_pipeline(loss_net: nn.Cell, micro_batches: int, interleave: int = 1) -> nn.Cell:
    """Loss cell split into ``micro_batches`` micro-batches by ``mindspore.parallel.nn.Pipeline`` (each optionally
    split again by ``MicroBatchInterleaved``); returns the mean loss over the micro-batches."""
    from mindspore.parallel.nn import MicroBatchInterleaved, Pipeline
    if micro_batches < 1:
        raise ValueError(f"parallel.micro_batches must be >= 1, got {micro_batches}")
    net = MicroBatchInterleaved(loss_net, interleave) if interleave > 1 else loss_net
    return MeanOverMicroBatches(Pipeline(net, micro_batches), micro_batches)


def pipeline_model(model: nn.Cell, loss_net: nn.Cell, parallel_cfg, embedding_cost: float = 0.0,
                   head_cost: float = 0.0) -> Tuple[nn.Cell, dict]:
    """Place ``model``'s cells on ``parallel_cfg.pipeline_stages`` stages and wrap ``loss_net``; returns the
    wrapped loss cell and the {cell: stage} plan. With one stage, only the interleave wrapper (if any) applies."""
    stages = parallel_cfg.pipeline_stages
    if stages == 1:
        if parallel_cfg.micro_batch_interleave > 1:
            from mindspore.parallel.nn import MicroBatchInterleaved
            return MicroBatchInterleaved(loss_net, parallel_cfg.micro_batch_interleave), {}
        return loss_net, {}
    plan = plan_stages(model, stages, embedding_cost, head_cost)
    assign_stages(model, plan)
    return wrap_pipeline(loss_net, parallel_cfg.micro_batches, parallel_cfg.micro_batch_interleave), plan
