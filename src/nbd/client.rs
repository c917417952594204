//! Client side of the codec (handshake client, request encoding, reply decoding), used by
//! `cryptvol bench` and tests. Sans-I/O like the server side.
