"""``python -m mmgroupmamba.trust_checkpoint SRC DST``: re-save a checkpoint you trust as plain data.

A module of its own because ``python -m`` runs a module after importing its package: ``mmgroupmamba/__init__``
imports :mod:`mmgroupmamba.checkpoint`, so running that module would import it twice (and runpy warns).
"""
import argparse

from mmgroupmamba.checkpoint import TRUST_COMMAND, trust_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=TRUST_COMMAND.rsplit(' ', 2)[0],
        description='Unpickle a checkpoint you trust (this can run code in it) and save it as plain data '
        '(tensors, numbers, strings, containers) that loads under torch.load(weights_only=True).')
    parser.add_argument('src', help='the checkpoint you trust')
    parser.add_argument('dst', help='where to write the plain-data copy')
    args = parser.parse_args(argv)
    dropped = trust_checkpoint(args.src, args.dst)
    print(f'saved {args.dst}' + (f'; dropped {len(dropped)} non-data objects: {", ".join(dropped)}' if dropped
                                 else ''))


if __name__ == '__main__':
    main()
