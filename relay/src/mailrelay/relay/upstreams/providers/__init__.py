"""HTTP API upstreams: one transport class per provider behind the relay's Transport protocol.

- `registry`: provider name -> transport class (`build_api_transport`,
  `preload_transports`); the only module that imports the provider modules, each lazily.
- one module per provider (`mailgun`, `ses`, `sparkpost`, `sendgrid`, `postmark`,
  `resend`, `webhook`). Raw-MIME providers (Mailgun, SES, SparkPost, webhook) send the
  spooled bytes unchanged; JSON providers (SendGrid, Postmark, Resend) rebuild the message
  from fields parsed by `mime`. A provider module never imports another one.
- shared by the providers: `base` (the `ApiTransport` class, throttle, error classes,
  credentials, metrics, idempotency keys), `http` (the HTTP client), `mime` (parsing for
  the JSON providers), `limits` (what each provider documents it accepts).

This package imports nothing: the relay's size checks use `limits` without loading the
HTTP client or any provider.
"""
