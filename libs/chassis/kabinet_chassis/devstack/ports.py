import socket

from kabinet_chassis.devstack.errors import StackError

LOOPBACK = "127.0.0.1"


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free_port(port: int, what: str, env_hint: str) -> None:
    if not port_is_free(port):
        raise StackError(
            f"port {port} for {what} is taken: stop whatever listens there "
            f"(`ss -ltnp 'sport = :{port}'`) or set {env_hint} to another port"
        )


def free_port() -> int:
    """An ephemeral loopback port that is free right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_until_listening(port: int, timeout_s: float, host: str = LOOPBACK) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.05)
    return False
