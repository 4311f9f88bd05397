"""The scan op that GroupMamba layers call."""
from .reference import selective_scan_reference


def selective_scan(u, delta, A, B, C, D, delta_bias, hw):
    """Selective scan of all channel groups of one GroupMamba layer, each in its own direction.

    Tensors are channels-last, positions in row-major order, as the layer's linear layers produce them:

    Args:
        u (Tensor): ``(batch, H*W, channels)`` scan input; channels are ``groups`` equal groups.
        delta (Tensor): ``(batch, H*W, channels)`` step sizes before ``softplus(delta + delta_bias)``.
        A (Tensor): ``(channels,)`` state decay rates (negative: ``-exp(A_logs)``).
        B (Tensor): ``(batch, H*W, groups)`` input projection of each group (``d_state=1``).
        C (Tensor): ``(batch, H*W, groups)`` output projection of each group.
        D (Tensor): ``(channels,)`` skip weights.
        delta_bias (Tensor): ``(channels,)``.
        hw (tuple[int, int]): the map's height and width; group ``g`` scans in
            ``SCAN_DIRECTIONS[g]`` order over it.

    Returns:
        Tensor: ``(batch, H*W, channels)`` in ``u``'s dtype, computed in fp32.
    """
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, hw)
