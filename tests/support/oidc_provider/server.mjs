// panva's oidc-provider (a certified OpenID Provider) configured for token-broker's integration
// tests: tests/support/oidc_provider.py starts it, one process per test, on a loopback port.
//
// Environment (all set by the fixture):
//   OIDCP_PORT                 the port to listen on (127.0.0.1); the issuer is http://127.0.0.1:PORT
//   OIDCP_ACCESS_TOKEN_TTL     seconds an access token lives (default 5)
//   OIDCP_REFRESH_TOKEN_TTL    seconds a refresh token lives (default 3600)
//   OIDCP_DPOP_REQUIRE_NONCE   "1": every DPoP proof must carry a server nonce (use_dpop_nonce)
//   OIDCP_CLIENTS              JSON list of client metadata, replacing the default clients below
//
// What it adds to the stock provider, and why:
//   - Refresh tokens rotate on every use (rotateRefreshToken: true). oidc-provider's own check
//     then makes a spent refresh token a theft signal: presenting it again revokes the whole
//     grant ("refresh token already used"). A broker fleet that spent one token twice loses
//     its grant here, as it would at Okta or Auth0.
//   - An interaction that logs in a fixed account and consents to what was asked, so a test
//     obtains an authorization code with plain HTTP (follow the redirects, keep the cookies).
//   - GET /test/stats: what the tests assert on (grants by type, reuse detected, grants
//     revoked, the expiry of every access token issued, the DPoP key of each).
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const env = process.env;
const port = Number(env.OIDCP_PORT);
if (!Number.isInteger(port) || port <= 0) {
  throw new Error('OIDCP_PORT must be the port to listen on');
}
const accessTtl = Number(env.OIDCP_ACCESS_TOKEN_TTL ?? 5);
const refreshTtl = Number(env.OIDCP_REFRESH_TOKEN_TTL ?? 3600);
const requireNonce = env.OIDCP_DPOP_REQUIRE_NONCE === '1';
const issuer = `http://127.0.0.1:${port}`;
const accountId = 'test-user';

const defaultClients = [
  {
    client_id: 'cc-client',
    client_secret: 'cc-secret-0123456789-abcdefghijklmnop',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'api',
  },
  {
    client_id: 'ac-client',
    client_secret: 'ac-secret-0123456789-abcdefghijklmnop',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1:9/callback'],
    token_endpoint_auth_method: 'client_secret_post',
    scope: 'api offline_access',
  },
  {
    // The resource server of the DPoP tests: it introspects the tokens it is shown.
    client_id: 'rs-client',
    client_secret: 'rs-secret-0123456789-abcdefghijklmnop',
    grant_types: [],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
  },
];
const clients = env.OIDCP_CLIENTS ? JSON.parse(env.OIDCP_CLIENTS) : defaultClients;

function privateJwk(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), alg, use: 'sig', kid: alg };
}

const stats = {
  grants: {}, // grant_type -> successful token responses
  errors: [], // {grant_type, error, error_description}
  reuse_detected: 0, // spent refresh tokens presented again
  grants_revoked: [], // grant ids revoked (by reuse detection or otherwise)
  access_tokens: {}, // token value -> {exp, jkt}
  dpop_nonce_challenges: 0, // use_dpop_nonce errors answered
};

const provider = new Provider(issuer, {
  clients,
  jwks: {
    keys: [
      privateJwk('ec', { namedCurve: 'P-256' }, 'ES256'),
      privateJwk('rsa', { modulusLength: 2048 }, 'RS256'),
    ],
  },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'offline_access', 'api'],
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    RefreshToken: refreshTtl,
    AuthorizationCode: 60,
    Grant: 3600,
    Interaction: 600,
    Session: 3600,
  },
  rotateRefreshToken: true,
  interactions: {
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true, allowedPolicy: async () => true },
    revocation: { enabled: true },
    dPoP: {
      enabled: true,
      nonceSecret: crypto.randomBytes(32),
      requireNonce: () => requireNonce,
    },
  },
});

// The login and consent prompts, answered at once: the fixed account, everything requested.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (ctx.method !== 'GET' || !match) {
    await next();
    return;
  }
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  let result;
  if (details.prompt.name === 'login') {
    result = { login: { accountId } };
  } else {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId, clientId: details.params.client_id });
    const missing = details.prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  }
  const to = await provider.interactionResult(ctx.req, ctx.res, result, {
    mergeWithLastSubmission: true,
  });
  ctx.status = 303;
  ctx.redirect(to);
});

provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/test/stats') {
    ctx.body = stats;
    return;
  }
  await next();
});

provider.on('grant.success', (ctx) => {
  const type = ctx.oidc.params.grant_type;
  stats.grants[type] = (stats.grants[type] ?? 0) + 1;
});
provider.on('grant.error', (ctx, error) => {
  stats.errors.push({
    grant_type: ctx.oidc.params?.grant_type,
    error: error.error,
    error_description: error.error_description,
    // The reason oidc-provider keeps to itself (the response says only "grant request is invalid").
    error_detail: error.error_detail,
  });
  if (error.error_detail === 'refresh token already used') stats.reuse_detected += 1;
  if (error.error === 'use_dpop_nonce') stats.dpop_nonce_challenges += 1;
});
provider.on('grant.revoked', (ctx, grantId) => {
  stats.grants_revoked.push(grantId);
});
for (const model of ['access_token', 'client_credentials']) {
  // The stored payload holds the exp the token response's expires_in was derived from.
  provider.on(`${model}.saved`, async (token) => {
    const stored = await token.constructor.find(token.jti, { ignoreExpiration: true });
    stats.access_tokens[token.jti] = { exp: stored?.exp ?? null, jkt: stored?.jkt ?? null };
  });
}
provider.on('server_error', (ctx, error) => {
  console.error('server_error', error);
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
