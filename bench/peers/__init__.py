"""The designs a user would pick instead of zfan, each with zfan's guarantees, measured beside it
by bench/run.py: rabbitmq.py, redis_streams.py and nats_jetstream.py, on what parties.py shares.
Each module has KEY and LABEL, unavailable(), Server, run() and latency()."""
