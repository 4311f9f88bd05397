"""Where an eager step's host time goes, by autograd node (backward) and by module (forward).

    python benchmarks/host_time_by_node.py [--models GroupMamba-T Swin-T] [--size 800 1344] [--device cuda]

For the det step of ``backbone_speed.py`` (bs 2, AMP fp16, forward + backward, eager), the host time spent in
each backward node (between the engine's pre- and post-hooks of the node: its Python or C++ backward and the
launches it makes) and in each module's forward (its children's included), summed by node name and module
class. A host-bound step (the GPU waits on its host) spends its wall time here; the rest of the host time is the
engine's and the Python between modules. Hooks cost a few microseconds each, so both columns are somewhat high; compare
models within one run. Runs on CPU too (tiny sizes, reference path), to check the script.
"""
import argparse
import collections
import time

import torch

from backbone_speed import build_backbones


def graph_nodes(root):
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return seen


def host_times(backbone, images, device):
    """``(forward {module class: [calls, s]}, backward {node name: [calls, s]}, forward s, backward s)`` of
    one step, after a warm-up step."""
    forward, backward = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
    starts = {}

    def pre_forward(module, args):
        starts[module] = time.perf_counter()

    def post_forward(module, args, output):
        row = forward[type(module).__name__]  # a module's time includes its children's
        row[0] += 1
        row[1] += time.perf_counter() - starts.pop(module)

    def step(record):
        backbone.zero_grad(set_to_none=True)
        handles = []
        if record:
            for module in list(backbone.modules())[1:]:
                handles += [module.register_forward_pre_hook(pre_forward),
                            module.register_forward_hook(post_forward)]
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16 if device.type == 'cuda' else torch.bfloat16):
            loss = sum(o.float().mean() for o in backbone(images))
        forward_s = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        if record:
            for node in graph_nodes(loss.grad_fn):
                def pre(grad_outputs, node=node):
                    starts[node] = time.perf_counter()

                def post(grad_inputs, grad_outputs, node=node):
                    row = backward[node.name()]
                    row[0] += 1
                    row[1] += time.perf_counter() - starts.pop(node)
                node.register_prehook(pre)
                node.register_hook(post)
        start = time.perf_counter()
        loss.backward()
        backward_s = time.perf_counter() - start
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return forward_s, backward_s

    step(False)
    step(False)
    plain = step(False)
    recorded = step(True)
    return forward, backward, plain, recorded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['GroupMamba-T', 'Swin-T'])
    parser.add_argument('--size', nargs=2, type=int, default=[800, 1344])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--rows', type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    backbones = build_backbones(sorted({name.rsplit('-', 1)[1] for name in args.models}), [''], 0.2)
    images = torch.randn(2, 3, *args.size, device=device)
    for name in args.models:
        backbone = backbones[name][0].to(device)
        backbone.train()
        forward, backward, plain, recorded = host_times(backbone, images, device)
        backbone.cpu()
        print(f'\n{name}, {device}, bs 2, {args.size[0]}x{args.size[1]}: host ms forward {plain[0] * 1e3:.1f}, '
              f'backward {plain[1] * 1e3:.1f} without hooks; {recorded[0] * 1e3:.1f} and {recorded[1] * 1e3:.1f} '
              'with them')
        for title, table, total in (('backward node', backward, recorded[1]),
                                    ('forward module (children included)', forward, recorded[0])):
            print(f'| {title} | calls | host ms | us per call | share of the phase |')
            print('| --- | ---: | ---: | ---: | ---: |')
            rows = sorted(table.items(), key=lambda kv: -kv[1][1])
            for key, (calls, seconds) in rows[:args.rows]:
                print(f'| {key} | {calls} | {seconds * 1e3:.2f} | {seconds / calls * 1e6:.1f} | '
                      f'{seconds / total:.0%} |')
            if title == 'backward node':  # nodes do not nest: their sum is the engine's time in them
                summed = sum(s for _, s in table.values())
                print(f'| all {len(table)} kinds | {sum(c for c, _ in table.values())} | {summed * 1e3:.2f} | | '
                      f'{summed / total:.0%} |')


if __name__ == '__main__':
    main()
