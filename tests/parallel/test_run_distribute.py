"""scripts/run_distribute.sh: argument handling and the commands it builds (``--print-only`` runs nothing), for
every launch mode; errors name the offending flag. The Ascend modes are only printed here."""
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "run_distribute.sh")
CONFIG = os.path.join(ROOT, "configs", "gpt", "tiny.yaml")


def run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=env or dict(os.environ))


def command_of(out: str, prefix="command: "):
    lines = [l[len(prefix):] for l in out.splitlines() if l.startswith(prefix)]
    return [shlex.split(l) for l in lines]


def test_cpu_data_parallel_command():
    p = run("--config", CONFIG, "--device", "CPU", "--nproc", "2", "--log-dir", "/tmp/logs", "--master-port",
            "9001", "--print-only", "--", "train.steps=3")
    assert p.returncode == 0, p.stderr
    (cmd,) = command_of(p.stdout)
    assert cmd[:9] == ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
                       "--master_port=9001", "--node_rank=0", "--log_dir=/tmp/logs", "--join=True",
                       "--cluster_time_out=600"]
    assert cmd[9:] == ["python", "-m", "ms_llm", "train", CONFIG, "--device", "CPU", "parallel.mode=data_parallel",
                       "parallel.data_parallel=2", "train.steps=3"]
    assert "logs: /tmp/logs/worker_<rank>.log" in p.stdout


def test_ascend_multi_node_command():
    p = run("--config", CONFIG, "--nproc", "8", "--nnodes", "4", "--node-rank", "2", "--master-addr", "10.0.0.1",
            "--overrides", "train.steps=10 parallel.model_parallel=8", "--print-only")
    assert p.returncode == 0, p.stderr
    (cmd,) = command_of(p.stdout)
    assert "--worker_num=32" in cmd and "--local_worker_num=8" in cmd and "--node_rank=2" in cmd
    assert "--master_addr=10.0.0.1" in cmd
    assert cmd[cmd.index("python"):] == ["python", "-m", "ms_llm", "train", CONFIG, "--device", "Ascend",
                                         "train.steps=10", "parallel.model_parallel=8"]
    assert "32 processes (8 on node 2 of 4) on Ascend" in p.stdout


def test_dry_run_command_sets_simulation_and_strategy_file():
    p = run("--config", CONFIG, "--nproc", "8", "--nnodes", "8", "--dry-run", "--sim-rank", "5", "--log-dir", "L",
            "--print-only")
    assert p.returncode == 0, p.stderr
    (cmd,) = command_of(p.stdout)
    assert cmd[:3] == ["MS_SIMULATION_LEVEL=1", "RANK_SIZE=64", "RANK_ID=5"]
    assert cmd[3:] == ["python", "-m", "ms_llm", "train", CONFIG, "--device", "Ascend", "train.steps=1",
                       "parallel.strategy_ckpt_save_file=L/strategy/strategy_rank5.ckpt"]
    assert "strategy file: L/strategy/strategy_rank5.ckpt" in p.stdout


def test_rank_table_commands(tmp_path):
    table = tmp_path / "rank_table.json"
    table.write_text("{}")
    p = run("--config", CONFIG, "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--rank-table", str(table),
            "--print-only")
    assert p.returncode == 0, p.stderr
    cmds = command_of(p.stdout)
    assert [c[:4] for c in cmds] == [[f"RANK_TABLE_FILE={table}", "DEVICE_ID=0", "RANK_ID=2", "RANK_SIZE=4"],
                                     [f"RANK_TABLE_FILE={table}", "DEVICE_ID=1", "RANK_ID=3", "RANK_SIZE=4"]]


@pytest.mark.parametrize("args,message", [
    ((), "--config is required"),
    (("--config", "missing.yaml"), "config file not found: missing.yaml"),
    (("--config", CONFIG, "--device", "GPU"), "--device must be Ascend or CPU"),
    (("--config", CONFIG, "--nproc"), "--nproc needs a value"),
    (("--config", CONFIG, "--nproc", "two"), "--nproc must be a non-negative integer"),
    (("--config", CONFIG, "--nnodes", "2", "--node-rank", "2"), "--node-rank 2 must be < --nnodes 2"),
    (("--config", CONFIG, "--device", "CPU", "--dry-run"), "--dry-run needs the Ascend target"),
    (("--config", CONFIG, "--rank-table", "nope.json"), "rank table not found: nope.json"),
    (("--config", CONFIG, "--bogus"), "unknown argument '--bogus'"),
    (("--config", CONFIG, "--", "train.steps"), "override 'train.steps' is not of the form key.sub=value"),
])
def test_bad_arguments_are_named(args, message):
    p = run(*args, "--print-only") if args else run()
    assert p.returncode == 2
    assert message in p.stderr, p.stderr


def test_python_flag_puts_its_bin_first_on_path(tmp_path):
    import sys
    p = run("--config", CONFIG, "--device", "CPU", "--python", sys.executable, "--print-only")
    assert p.returncode == 0, p.stderr
    p = run("--config", CONFIG, "--device", "CPU", "--python", str(tmp_path / "nope" / "python"), "--print-only")
    assert p.returncode == 2 and "is not an executable" in p.stderr
