"""Reading Inductor's generated wrapper modules: the launches and the other statements of their ``call()``.

Shared by ``compiled_kernels.py`` (wrappers generated for a fake H200 on this CPU) and ``profile_step.py --compile``
(the wrappers a real compile loaded on the GPU machine, so that a profile says which kernels its launches are).
"""
import ast
import collections
import re
from pathlib import Path

LAUNCH = re.compile(r'(\w+)\.run\(')
LIBRARY = re.compile(r'(extern_kernels\.\w+|aten\.\w+(?:\.\w+)?|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(')
ORIGIN = re.compile(r'Original ATen: \[(.*)\]')


def launches(source):
    """``(by_kind, by_origin)`` Counters of the launches in a wrapper's ``call()``: kind (``inductor pointwise``,
    ``ours _scan_fwd_kernel``, ``extern_kernels.mm`` ...) and, for Inductor's kernels, the ATen ops fused."""
    body = source[source.index('def call('):]
    by_kind, by_origin, origin = collections.Counter(), collections.Counter(), ''
    for line in (raw.strip() for raw in body.splitlines()):
        if line.startswith('#'):
            found = ORIGIN.search(line)
            origin = found.group(1) if found else origin
            continue
        match = LAUNCH.match(line)
        if match:
            name = match.group(1)
            kind = re.match(r'triton_(poi|red|per|for|tem)_', name)
            if kind:
                by_kind[f'inductor {kind.group(1)}'] += 1
                by_origin[f'{kind.group(1)}: {origin}'] += 1
            else:
                by_kind[f'ours {re.sub(r"_[0-9]+$", "", name)}'] += 1
            origin = ''
            continue
        match = LIBRARY.search(line)
        if match:
            by_kind[match.group(1)] += 1
    return by_kind, by_origin


# The wrapper's other statements, by what they cost the host: each one runs in Python at every step.
STATEMENTS = (('buffer allocations', re.compile(r'\bempty_strided\w*\(')),
              ('tensor reinterpretations', re.compile(r'\breinterpret_tensor\(')),
              ('input checks', re.compile(r'\b(assert_size_stride\w*|copy_if_misaligned|assert_tensor_metadata)\(')))


def wrapper_statements(source):
    """Counter of a wrapper's ``call()`` statements: all of them (comments aside), those of each
    ``STATEMENTS`` kind, the launches, and the arguments the launches pass (our kernels take 13-33 each:
    Triton's launcher handles every one at every call)."""
    body = source[source.index('def call('):]
    counts = collections.Counter()
    for line in (raw.strip() for raw in body.splitlines()):
        if not line or line.startswith('#'):
            continue
        counts['statements'] += 1
        for kind, pattern in STATEMENTS:
            counts[kind] += len(pattern.findall(line))
        if LAUNCH.match(line) or LIBRARY.search(line):
            counts['launches'] += 1
            try:
                call = ast.parse(line).body[0].value
            except (SyntaxError, AttributeError, IndexError):
                continue
            if isinstance(call, ast.Call):
                counts['launch arguments'] += len(call.args) + len(call.keywords)
    return counts


KERNEL_SOURCE = re.compile(r"^(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)'''", re.S | re.M)
ELEMENTS = re.compile(r'^\s*xnumel = (\d+)\s*$', re.M)


def widest_elements(source, top):
    """The ``top`` pointwise kernels (or combo sub-kernels) of a wrapper module whose elements each issue the most
    loads, as ``(loads, elements, kernel name)``, most load instructions (loads x elements) first. Inductor writes a
    concatenation of N pieces as one pointwise kernel that, for every element, tests each piece and issues its
    masked load: a stage-wide concatenation of GroupMamba-B's weights (336 pieces) took 95 ms of a 159 ms det
    step that way (README, thirty-first session). The launch count does not show such a kernel; this does. Each
    sub-kernel of a combo kernel starts at its own ``xnumel = N``; sizes that are symbolic are left out."""
    found = []
    for name, body in KERNEL_SOURCE.findall(source):
        if not name.startswith('triton_poi_'):
            continue
        starts = [m.start() for m in ELEMENTS.finditer(body)] + [len(body)]
        for start, end in zip(starts, starts[1:]):
            section = body[start:end]
            found.append((section.count('tl.load('), int(ELEMENTS.match(section).group(1)), name))
    return sorted(found, key=lambda f: -f[0] * f[1])[:top]


def loaded_wrapper_modules():
    """``[(module, source)]``: the wrapper modules Inductor has loaded in this process, in the order it loaded them
    (a compiled graph's forward before its backward). Inductor's kernel modules (no ``call()``) are left out."""
    from torch._inductor.codecache import PyCodeCache

    found = []
    for module in PyCodeCache.modules:
        path = getattr(module, '__file__', None)
        if path and Path(path).is_file():
            source = Path(path).read_text()
            if 'def call(' in source:
                found.append((module, source))
    return found


def static_launch_table(modules):
    """Markdown: the Triton kernels the wrapper ``modules`` launch (Inductor's generated ones and ours), by whether
    every compiled variant of each goes through Inductor's static launcher (a C++ launch from the cubin) or some
    through Triton's own Python launcher, which costs more host time a launch. Read from each kernel's autotuner:
    the classes of its compile results (``StaticTritonCompileResult`` or not, as Inductor's own
    ``is_statically_launchable`` tests them); an autotuner holding none is counted as unknown.
    ``static_launch_user_defined_triton_kernels`` asks for ours to go through the static launcher; Inductor logs
    why it bypasses a kernel at INFO (``torch._inductor.runtime.triton_heuristics``; or set
    ``TORCHINDUCTOR_STRICT_STATIC_CUDA_LAUNCHER=1`` to raise there instead)."""
    columns = ('static launcher', 'Triton launcher', 'unknown')
    counts = collections.Counter()
    for module in modules:
        for name, value in vars(module).items():
            results = getattr(value, 'compile_results', None)
            if results is None or not hasattr(value, 'launchers'):
                continue  # not an autotuner
            owner = 'inductor' if re.match(r'triton_(poi|red|per|for|tem)_', name) else 'ours'
            if not results:
                column = 'unknown'
            elif all(type(r).__name__.startswith('Static') for r in results):
                column = 'static launcher'
            else:
                column = 'Triton launcher'
            counts[owner, column] += 1
    lines = ['| kernels | ' + ' | '.join(columns) + ' |', '| --- |' + ' ---: |' * len(columns)]
    for owner in ('inductor', 'ours'):
        lines.append(f'| {owner} | ' + ' | '.join(str(counts[owner, c]) for c in columns) + ' |')
    return '\n'.join(lines)


def launch_table(sources):
    """Markdown: the launches of each wrapper in ``sources`` by kind (as :func:`launches` names them), most first.
    Raises ValueError for no sources: a table of zeros would read as a step without launches, where the
    likelier cause is a graph compiled with ``cpp_wrapper=True``, whose wrapper is C++ and not read here."""
    if not sources:
        raise ValueError('no Python wrapper to read (with cpp_wrapper=True Inductor generates its wrapper in C++, '
                         'which this listing does not read)')
    counts = [launches(source)[0] for source in sources]
    kinds = sorted(set().union(*counts), key=lambda k: -sum(c[k] for c in counts))
    lines = ['| launches | ' + ' | '.join(f'graph {i + 1}' for i in range(len(counts))) + ' | all |',
             '| --- |' + ' ---: |' * (len(counts) + 1)]
    for kind in kinds:
        lines.append(f'| {kind} | ' + ' | '.join(str(c[kind]) for c in counts) + f' | {sum(c[kind] for c in counts)} |')
    totals = [sum(c.values()) for c in counts]
    lines.append('| **total** | ' + ' | '.join(f'**{t}**' for t in totals) + f' | **{sum(totals)}** |')
    return '\n'.join(lines)
