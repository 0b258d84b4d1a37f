"""The call's logic, sans-I/O: plain classes that take events and return actions. No sockets, no clocks of their own."""
