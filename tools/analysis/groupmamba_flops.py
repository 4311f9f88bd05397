"""FLOPs and parameters of GroupMamba classifier configs, counting the selective scan.

    python tools/analysis/groupmamba_flops.py configs/mmpretrain/groupmamba_{t,s,b}_8xb128_in1k.py [--shape 224 224]

FLOPs are multiply-adds of one image (mmengine's analysis; see mmgroupmamba/cls/flops.py).
"""
import argparse

from mmgroupmamba.cls.flops import SCAN_OP_NAME, config_complexity


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='+')
    parser.add_argument('--shape', type=int, nargs=2, default=(224, 224), metavar=('H', 'W'))
    args = parser.parse_args(argv)
    scan_key = SCAN_OP_NAME.split('::', 1)[1]
    print(f'input 3x{args.shape[0]}x{args.shape[1]}')
    print(f'{"config":<45} {"params (M)":>10} {"FLOPs (G)":>10} {"of which scan (G)":>18}')
    for path in args.configs:
        result = config_complexity(path, (3, *args.shape))
        scan = result['flops_by_operator'][scan_key]
        print(f'{path:<45} {result["params"] / 1e6:>10.2f} {result["flops"] / 1e9:>10.3f} {scan / 1e9:>18.4f}')


if __name__ == '__main__':
    main()
