"""The command line: one argparse tree for every python -m catreview command."""
