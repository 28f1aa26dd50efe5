import socket
import threading


def echo_server():
    """A loopback echo server in a thread; returns its port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn, server:
            conn.sendall(conn.recv(1024).upper())

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def shout(port, text):
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(text.encode())
        return conn.recv(1024).decode()
