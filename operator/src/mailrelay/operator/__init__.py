"""The mailrelay operator: reconciles MailRelay and MailRoute resources."""
