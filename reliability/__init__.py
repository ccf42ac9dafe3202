"""The reliability run: ``python -m reliability.run`` (``make soak``), the evidence that bad input and faults hold.

Like ``bench/`` for speed, it runs against real ``deskpush serve`` processes
and writes a table (``reliability/RESULTS.md``). Read in this order:

* ``run``: the command, the tables, the exit status;
* ``proc``: a server process, its config file, log, RSS and fds;
* ``wire``: the clients (websockets' sans-I/O client on sockets the run owns);
* ``soak``: the churn soak (agents coming and going, integrators cut and resumed);
* ``strategies`` and ``fuzz``: the hypothesis fuzz of both endpoints and the HTTP side;
* ``differential``: deskpush's frame parser against websockets' alone;
* ``faults``: drops, restarts, slow readers, floods, fd exhaustion.
"""
