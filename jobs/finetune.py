"""Ray job entrypoint: `ray job submit --working-dir . -- python -m jobs.finetune ARGS...`.

ARGS are exactly those of `splinter finetune`; the driver attaches to the cluster that runs the job (Ray sets
RAY_ADDRESS for it).
"""

from jobs._entry import run_command

if __name__ == "__main__":
    run_command("finetune")
