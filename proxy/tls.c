/* tls: OpenSSL contexts for both links and TLS bufferevents over sockets. */
#include <stdio.h>
#include <unistd.h>
#include <string.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>

#include "tls.h"

#define TLS_COMMON_OPTIONS \
	(SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE)

static void
tls_last_error(const char *what, const char *path, char *err, size_t errlen)
{
	char reason[256];
	unsigned long e = ERR_get_error();

	ERR_error_string_n(e, reason, sizeof(reason));
	snprintf(err, errlen, "%s: %s: %s", what, path, e ? reason : "unknown error");
	ERR_clear_error();
}

static SSL_CTX *
tls_ctx_base(const SSL_METHOD *method, const struct config *cfg, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(method);

	if (ctx == NULL) {
		tls_last_error("tls", "SSL_CTX_new", err, errlen);
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, TLS_COMMON_OPTIONS);
	/* No SSL_MODE_ENABLE_PARTIAL_WRITE: libevent 2.1's bufferevent_openssl
	 * goes on to the next buffer chain after a short SSL_write, so a chain
	 * of over one record cut by a full socket came out reordered. */
	SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
	if (cfg->tls_ciphers[0] && !SSL_CTX_set_cipher_list(ctx, cfg->tls_ciphers)) {
		tls_last_error("tls_ciphers", cfg->tls_ciphers, err, errlen);
		SSL_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

SSL_CTX *
tls_server_ctx_new(const struct config *cfg, char *err, size_t errlen)
{
	const char *key = cfg->tls_key[0] ? cfg->tls_key : cfg->tls_cert;
	SSL_CTX *ctx;

	err[0] = '\0';
	if (cfg->tls_cert[0] == '\0')
		return NULL;
	if ((ctx = tls_ctx_base(TLS_server_method(), cfg, err, errlen)) == NULL)
		return NULL;
	if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert) != 1) {
		tls_last_error("tls_cert", cfg->tls_cert, err, errlen);
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
		tls_last_error("tls_key", key, err, errlen);
		goto fail;
	}
	if (SSL_CTX_check_private_key(ctx) != 1) {
		tls_last_error("tls_key", "does not match tls_cert", err, errlen);
		goto fail;
	}
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}

SSL_CTX *
tls_client_ctx_new(const struct config *cfg, char *err, size_t errlen)
{
	SSL_CTX *ctx;

	err[0] = '\0';
	if ((ctx = tls_ctx_base(TLS_client_method(), cfg, err, errlen)) == NULL)
		return NULL;
	if (cfg->upstream_tls_verify) {
		int loaded = cfg->upstream_ca[0] ?
		    SSL_CTX_load_verify_locations(ctx, cfg->upstream_ca, NULL) :
		    SSL_CTX_set_default_verify_paths(ctx);
		if (loaded != 1) {
			tls_last_error("upstream_ca", cfg->upstream_ca[0] ? cfg->upstream_ca :
			    "(system store)", err, errlen);
			SSL_CTX_free(ctx);
			return NULL;
		}
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	} else
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	return ctx;
}

static int
tls_is_ip(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

SSL *
tls_upstream_ssl_new(SSL_CTX *ctx, const struct config *cfg)
{
	const char *name = cfg->upstream_sni[0] ? cfg->upstream_sni : cfg->upstream.host;
	SSL *ssl = SSL_new(ctx);

	if (ssl == NULL)
		return NULL;
	if (!tls_is_ip(name))
		SSL_set_tlsext_host_name(ssl, name);
	if (cfg->upstream_tls_verify) {
		if (tls_is_ip(name))
			X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name);
		else
			SSL_set1_host(ssl, name);
	}
	return ssl;
}

struct bufferevent *
tls_bufferevent_new(struct event_base *base, int fd, SSL *ssl, int accepting)
{
	struct bufferevent *bev;

	bev = bufferevent_openssl_socket_new(base, fd, ssl,
	    accepting ? BUFFEREVENT_SSL_ACCEPTING : BUFFEREVENT_SSL_CONNECTING,
	    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (bev != NULL)
		/* A peer that vanishes without close_notify is an ordinary EOF for IMAP. */
		bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
	return bev;
}

void
tls_error_describe(struct bufferevent *bev, char *buf, size_t len)
{
	SSL *ssl = bufferevent_openssl_get_ssl(bev);
	unsigned long e;
	size_t n = 0;

	buf[0] = '\0';
	while ((e = bufferevent_get_openssl_error(bev)) != 0 && n + 2 < len) {
		if (ERR_GET_LIB(e) == 0)
			continue;	/* libevent's own placeholder entries say nothing */
		if (n > 0)
			buf[n++] = ';', buf[n] = '\0';
		ERR_error_string_n(e, buf + n, len - n);
		n = strlen(buf);
	}
	if (ssl != NULL && SSL_get_verify_result(ssl) != X509_V_OK && n + 2 < len)
		snprintf(buf + n, len - n, "%scertificate verify: %s", n ? "; " : "",
		    X509_verify_cert_error_string(SSL_get_verify_result(ssl)));
	if (buf[0] == '\0')
		snprintf(buf, len, "connection closed during TLS");
}

int
tls_peer_silent(struct bufferevent *bev)
{
	SSL *ssl = bufferevent_openssl_get_ssl(bev);
	BIO *rbio = ssl != NULL ? SSL_get_rbio(ssl) : NULL;

	return rbio != NULL && BIO_number_read(rbio) == 0;
}

void
tls_close_notify(struct bufferevent *bev)
{
	struct bufferevent *under = bufferevent_get_underlying(bev);
	struct bufferevent *tb = under != NULL ? under : bev;
	SSL *ssl = bufferevent_openssl_get_ssl(tb);

	if (ssl == NULL || !SSL_is_init_finished(ssl) || (SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN))
		return;
	if (evbuffer_get_length(bufferevent_get_output(bev)) > 0 ||
	    evbuffer_get_length(bufferevent_get_output(tb)) > 0)
		return;
	/* Non-blocking: the alert is written now or not at all; the peer's
	 * close_notify is not waited for (RFC 8446 6.1 allows that). */
	SSL_shutdown(ssl);
	ERR_clear_error();
}

void
tls_describe(struct bufferevent *bev, char *buf, size_t len)
{
	SSL *ssl = bufferevent_openssl_get_ssl(bev);

	if (ssl == NULL)
		snprintf(buf, len, "plaintext");
	else
		snprintf(buf, len, "%s %s", SSL_get_version(ssl), SSL_get_cipher_name(ssl));
}

/*
 * The socket itself moves to the TLS bufferevent, never a dup() of it: with
 * epoll's changelist the plain bufferevent's delete reaches the kernel after
 * the close, which then still knows the open socket under the old number, so
 * that registration stayed behind and, the socket being writable, woke the
 * loop on every pass: a core spent per session that had used STARTTLS.
 */
struct bufferevent *
tls_upgrade(struct bufferevent *plain, SSL *ssl, int accepting)
{
	struct event_base *base = bufferevent_get_base(plain);
	evutil_socket_t fd = bufferevent_getfd(plain);

	bufferevent_setfd(plain, -1);	/* so that freeing it does not close fd */
	bufferevent_free(plain);
	if (fd < 0) {
		SSL_free(ssl);
		return NULL;
	}
	struct bufferevent *bev = tls_bufferevent_new(base, fd, ssl, accepting);
	if (bev == NULL) {
		close(fd);
		SSL_free(ssl);
	}
	return bev;
}
