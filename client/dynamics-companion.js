/*
 * Dynamics Companion portal client: a small, dependency-free script for Power Pages pages.
 *
 *   var companion = DynamicsCompanion.create({
 *     baseUrl: "https://<function-app>.azurewebsites.net/api", // the companion's /api
 *     clientId: "<ImplicitGrantFlow/RegisteredClientId>"
 *   });
 *   companion.me().then(function (contact) { ... });
 *
 * It gets the signed-in user's token from the portal (/_services/auth/token, the Power Pages
 * OAuth implicit grant), calls the companion with it, and runs the connect flow in a popup
 * whose result comes back by postMessage from the companion's origin.
 *
 * The flow is bound to this page: it makes a random secret, registers only its SHA-256 when
 * it starts the connection, and hands the secret to the popup (on the companion's origin,
 * before any provider page) by postMessage. An authorization link opened anywhere else is
 * refused at the callback.
 */
(function (global) {
  "use strict";

  function CompanionError(code, message, status) {
    this.name = "CompanionError";
    this.code = code;
    this.message = message;
    this.status = status;
  }
  CompanionError.prototype = Object.create(Error.prototype);

  function decodePayload(jwt) {
    var part = jwt.split(".")[1] || "";
    var b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    return JSON.parse(atob(b64));
  }

  function create(options) {
    if (!options || !options.baseUrl || !options.clientId) {
      throw new CompanionError("bad-options", "DynamicsCompanion.create needs baseUrl and clientId", 0);
    }
    var baseUrl = options.baseUrl.replace(/\/+$/, "");
    var apiOrigin = new URL(baseUrl, global.location.href).origin;
    var tokenUrl = options.tokenUrl || "/_services/auth/token";
    var cached = null;

    // The portal's token for this user, reused until a minute before it expires.
    function token() {
      if (cached && cached.exp - 60 > Date.now() / 1000) return Promise.resolve(cached.jwt);
      var url = tokenUrl + "?client_id=" + encodeURIComponent(options.clientId);
      return fetch(url, { method: "POST", credentials: "same-origin" }).then(function (res) {
        var responded = res.headers.get("X-Responded-JSON");
        if (responded && JSON.parse(responded).status === 401) {
          throw new CompanionError("not-signed-in", "Sign in to the portal first.", 401);
        }
        if (!res.ok) throw new CompanionError("token-failed", "The portal did not issue a token (" + res.status + ").", res.status);
        return res.text();
      }).then(function (text) {
        var jwt = text.trim();
        cached = { jwt: jwt, exp: decodePayload(jwt).exp || 0 };
        return jwt;
      });
    }

    function call(method, path, body) {
      return token().then(function (jwt) {
        var init = { method: method, headers: { Authorization: "Bearer " + jwt }, credentials: "omit" };
        if (body !== undefined) {
          init.headers["Content-Type"] = "application/json";
          init.body = JSON.stringify(body);
        }
        return fetch(baseUrl + path, init);
      }).then(function (res) {
        return res.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
          if (!res.ok) {
            var code = data && data.type ? String(data.type).split(":").pop() : "http-" + res.status;
            throw new CompanionError(code, (data && data.detail) || res.statusText, res.status);
          }
          return data;
        });
      });
    }

    function hex(buffer) {
      return Array.prototype.map.call(new Uint8Array(buffer), function (b) {
        return ("0" + b.toString(16)).slice(-2);
      }).join("");
    }

    // 32 random bytes, base64url; and the SHA-256 of it in hex, which is all we register.
    function newBinding() {
      var bytes = new Uint8Array(32);
      global.crypto.getRandomValues(bytes);
      var secret = btoa(String.fromCharCode.apply(null, bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
      return global.crypto.subtle.digest("SHA-256", new TextEncoder().encode(secret)).then(function (digest) {
        return { secret: secret, hash: hex(digest) };
      });
    }

    // Connects the user's account at a provider. Call it from a click handler: the popup
    // is opened at once, so browsers do not block it.
    function connect(provider) {
      var popup = global.open("about:blank", "dynamics-companion-connect", "width=520,height=700");
      var binding;
      return newBinding().then(function (b) {
        binding = b;
        return call("POST", "/portal/connections", { provider: provider, binding: b.hash });
      }).then(function (started) {
        if (!popup) throw new CompanionError("popup-blocked", "Allow pop-ups for this site to connect.", 0);
        popup.location.href = started.bind_url;
        return new Promise(function (resolve, reject) {
          var timer = setInterval(function () {
            if (popup.closed) {
              cleanup();
              reject(new CompanionError("popup-closed", "The window was closed before the connection finished.", 0));
            }
          }, 500);
          function cleanup() {
            clearInterval(timer);
            global.removeEventListener("message", onMessage);
          }
          function onMessage(event) {
            var d = event.data;
            if (event.origin !== apiOrigin || !d) return;
            if (d.type === "dynamics-companion:bind-ready" && event.source === popup) {
              // Only to the companion's origin: the secret never reaches another page.
              popup.postMessage({ type: "dynamics-companion:bind", secret: binding.secret,
                                  authorization_url: started.authorization_url }, apiOrigin);
              return;
            }
            if (d.type !== "dynamics-companion:connection") return;
            cleanup();
            if (d.status === "active") resolve({ connection_id: d.connection_id, status: d.status });
            else reject(new CompanionError(d.error || "failed", "The connection was not authorized (" + (d.error || d.status) + ").", 0));
          }
          global.addEventListener("message", onMessage);
        });
      }, function (err) {
        if (popup) popup.close();
        throw err;
      });
    }

    function pathOf(id) { return "/portal/connections/" + encodeURIComponent(id); }

    return {
      token: token,
      me: function () { return call("GET", "/portal/me"); },
      connections: function () { return call("GET", "/portal/connections").then(function (r) { return r.connections; }); },
      connect: connect,
      disconnect: function (id) { return call("DELETE", pathOf(id)); },
      proxy: function (id, method, path, body) {
        return call(method, pathOf(id) + "/proxy/" + String(path).replace(/^\/+/, ""), body);
      }
    };
  }

  global.DynamicsCompanion = { create: create, CompanionError: CompanionError };
})(window);
