"""Train Crane's prompts: a thin wrapper around `crane-hf train` (same options).

    accelerate launch examples/train_crane.py --data /data/mvtec:test --output-dir runs/mvtec
    accelerate launch --multi_gpu --num_processes 4 examples/train_crane.py --data /data/visa:test \
        --variant crane+ --output-dir runs/visa --cache-features
    python examples/train_crane.py --help

Try it offline on the synthetic defect dataset and small random backbones (meaningless prompts, real pipeline):

    python -m crane_hf.data.synthetic --output /tmp/synthetic
    python benchmarks/learnability.py --help
"""

from crane_hf.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
