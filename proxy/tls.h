/* tls: OpenSSL contexts for both links and TLS bufferevents over sockets. */
#ifndef TLS_H
#define TLS_H

#include <stddef.h>
#include <openssl/ssl.h>
#include <event2/bufferevent.h>

#include "config.h"

/* The context clients handshake with (listen_tls and STARTTLS): TLS 1.2+,
 * no compression, no renegotiation. NULL with err set when the certificate or
 * key cannot be loaded; NULL without error when no certificate is configured. */
SSL_CTX *tls_server_ctx_new(const struct config *cfg, char *err, size_t errlen);

/* The context used towards the upstream: TLS 1.2+, verification per config. */
SSL_CTX *tls_client_ctx_new(const struct config *cfg, char *err, size_t errlen);

/* A client-side SSL for the upstream link with SNI and hostname checks set. */
SSL *tls_upstream_ssl_new(SSL_CTX *ctx, const struct config *cfg);

/* A TLS bufferevent over fd (ownership of fd passes to it). */
struct bufferevent *tls_bufferevent_new(struct event_base *base, int fd, SSL *ssl,
    int accepting);

/* The reason the last TLS operation on bev failed, for logs. */
void tls_error_describe(struct bufferevent *bev, char *buf, size_t len);

/* The peer closed a TLS link without sending a single byte: a port probe
 * (a readiness or health check), not a failed handshake. */
int tls_peer_silent(struct bufferevent *bev);

/* An orderly end: send close_notify (answering the peer's, if it sent one)
 * before the socket closes. bev may be COMPRESS's filter over the TLS one.
 * Does nothing for plaintext, an unfinished or failed handshake, or while
 * output is still queued (never cut into a record). */
void tls_close_notify(struct bufferevent *bev);

/* "TLSv1.3 TLS_AES_256_GCM_SHA384" for logs. */
void tls_describe(struct bufferevent *bev, char *buf, size_t len);

/* Replace a plaintext socket bufferevent by a TLS one on the same socket (the
 * plain one is freed). Its output must have been flushed and its unread input
 * is discarded: bytes sent before the handshake must never count as TLS data. */
struct bufferevent *tls_upgrade(struct bufferevent *plain, SSL *ssl, int accepting);

#endif
