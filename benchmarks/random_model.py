"""Save a random-weight model of a real shape (gemma-2-9b, gemma-2-2b, llama-3.1-8b) for GPU smoke runs.

Usage:
    python benchmarks/random_model.py --shape gemma-2-9b --num_layers 4 --tokenizer .device/tokenizers/gemma-2 \
        --out /tmp/g9
"""

import argparse


def main(argv=None):
    from shapes import SHAPES, save_random_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", required=True, help="Tokenizer folder of the shape's family")
    parser.add_argument("--out", required=True, help="Folder to write the model to")
    parser.add_argument("--num_layers", type=int, default=None, help="Fewer layers than the real model")
    args = parser.parse_args(argv)
    print(save_random_model(args.shape, args.tokenizer, args.out, args.num_layers))


if __name__ == "__main__":
    main()
