"""The mailrelay relay: SMTP submission in, durable spool, delivery out."""
