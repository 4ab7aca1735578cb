"""Ray job entrypoint: `ray job submit --working-dir . -- python -m jobs.pretrain ARGS...`.

ARGS are exactly those of `splinter pretrain` (MINED OUTPUT and a model source); the driver attaches
to the cluster that runs the job (Ray sets RAY_ADDRESS for it) and runs Ray Train there.
"""

from jobs._entry import run_command

if __name__ == "__main__":
    run_command("pretrain")
