"""Train Crane's prompts: a thin wrapper around `crane-hf train`, with the same options (`--help`).

Try it offline, end to end: a synthetic defect dataset and small backbones with RANDOM weights (everything runs, the
checkpoints are real; the prompts it learns are MEANINGLESS):

    python -m crane_hf.data.synthetic --output synthetic-defects --classes brick,grass --image-size 128
    python -m crane_hf.small_backbones --output small-backbones
    accelerate launch examples/train_crane.py --data synthetic-defects:test --clip small-backbones/clip \
        --output-dir random-prompts --epochs 1

Real use, with the paper's backbones from the Hugging Face Hub (or its cache, or downloaded folders given as
`--clip` / `--dino`):

    accelerate launch examples/train_crane.py --data /data/mvtec:test --output-dir runs/mvtec
    accelerate launch --multi_gpu --num_processes 4 examples/train_crane.py --data /data/visa:test \
        --variant crane+ --output-dir runs/visa --cache-features
"""

from crane_hf.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
