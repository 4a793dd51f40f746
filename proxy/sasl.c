/* sasl: reading the user name out of a SASL PLAIN response, never keeping the password. */
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "sasl.h"

#define SASL_MAX 2048	/* a PLAIN response is small; bigger is not one */

int
sasl_plain_user(const char *b64, size_t len, char *user, size_t userlen)
{
	unsigned char raw[SASL_MAX / 4 * 3 + 3];
	const unsigned char *authzid, *authcid, *nul1, *nul2;
	size_t pad = 0, n;
	int dec, rc = -1;

	if (len == 0 || len > SASL_MAX || len % 4 != 0 || userlen == 0)
		return -1;
	while (pad < 2 && b64[len - 1 - pad] == '=')
		pad++;
	dec = EVP_DecodeBlock(raw, (const unsigned char *)b64, (int)len);
	if (dec < 0 || (size_t)dec < pad)
		goto out;
	n = (size_t)dec - pad;
	authzid = raw;
	if ((nul1 = memchr(raw, '\0', n)) == NULL)
		goto out;
	authcid = nul1 + 1;
	if ((nul2 = memchr(authcid, '\0', n - (size_t)(authcid - raw))) == NULL)
		goto out;
	if (nul1 > authzid) {
		authcid = authzid;	/* acting as authzid */
		nul2 = nul1;
	}
	if (nul2 == authcid || (size_t)(nul2 - authcid) >= userlen)
		goto out;
	memcpy(user, authcid, (size_t)(nul2 - authcid));
	user[nul2 - authcid] = '\0';
	rc = 0;
out:
	OPENSSL_cleanse(raw, sizeof(raw));
	return rc;
}
