#!/usr/bin/env python
"""Run the post-training demonstrations on the embedded default model.

    python run_all_demonstrations.py                         # every method
    python run_all_demonstrations.py --category fine-tuning  # fine-tuning | rl | test-time
    python run_all_demonstrations.py --method sft --quick    # one method, small and fast
    python run_all_demonstrations.py --model posttrain:smollm2-135m --output-dir runs/demo-real   # the real-model track
"""
import argparse
import sys

from posttrain.cli import EPILOG, add_demo_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(parser)
    parser.parse_args()  # --help and bad flags are answered here, with this script's name
    sys.exit(main(["demo", *sys.argv[1:]]))
