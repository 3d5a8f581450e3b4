"""The roles: each module owns its sockets and drives the socket-free core."""
