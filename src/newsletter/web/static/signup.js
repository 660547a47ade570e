// The signup form's proof of work (ALTCHA's version 1 protocol; the server side is
// newsletter/signup/challenge.py). On each form with data-altcha-challenge (the
// challenge as JSON) it finds the number whose SHA-256(salt + number) is the
// challenge, with crypto.subtle, a batch of hashes at a time so that the page stays
// responsive, and puts base64(JSON of algorithm, challenge, number, salt, signature)
// into the form's hidden input name="altcha" (made if the form has none).
//
// A submit before it is solved waits for it, then goes on. If it cannot be solved
// (no crypto.subtle outside a secure context, a malformed challenge, no number
// found) the form is left as it was and submits with the field empty: the server
// decides. Nothing visible changes; the form's data-altcha-state says "solving",
// "solved" or "failed", and data-altcha-took the milliseconds it took.
//
// Runs under Content-Security-Policy script-src 'self': no inline script, no eval,
// no worker, nothing fetched.
(function () {
  "use strict";

  // Hashes are asked for a batch at a time (the browser computes them off the main
  // thread), each sized to take about SLICE milliseconds; between batches the page
  // runs its timers and paints (measured: no gap between frames above about 70 ms,
  // slowed 4x as well), so it stays responsive on a slow phone too.
  var SLICE = 10;
  var FIRST_BATCH = 500;
  var MAX_BATCH = 20000;

  function hexBytes(hex) {
    if (!/^[0-9a-f]{64}$/.test(hex)) {
      throw new Error("the challenge is not SHA-256 hex");
    }
    var bytes = new Uint8Array(32);
    for (var i = 0; i < 32; i++) {
      bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
    }
    return bytes;
  }

  function sameBytes(buffer, expected) {
    var got = new Uint8Array(buffer);
    for (var i = 0; i < expected.length; i++) {
      if (got[i] !== expected[i]) {
        return false;
      }
    }
    return true;
  }

  // salt + the number's decimal digits (ASCII), written into one buffer: digest()
  // copies what it is given before it returns (WebCrypto: "get a copy of the bytes"),
  // so the next number may overwrite it, and no hash allocates a buffer of its own.
  function messages(salt) {
    var prefix = new TextEncoder().encode(salt);
    var buffer = new Uint8Array(prefix.length + 16);
    var views = [];
    buffer.set(prefix);
    return function (n) {
      var digits = String(n);
      for (var i = 0; i < digits.length; i++) {
        buffer[prefix.length + i] = digits.charCodeAt(i);
      }
      if (!views[digits.length]) {
        views[digits.length] = buffer.subarray(0, prefix.length + digits.length);
      }
      return views[digits.length];
    };
  }

  // Let the page run its timers and paint: while hashes are being computed, Chromium
  // runs their answers before timers and rendering, so batch after batch would starve
  // them. A task of its own (setTimeout) comes after what is waiting.
  function nextTask() {
    return new Promise(function (resolve) {
      setTimeout(resolve, 0);
    });
  }

  // The number that solves the challenge, or null if there is none up to maxnumber.
  async function solve(challenge) {
    var target = hexBytes(challenge.challenge);
    var message = messages(challenge.salt);
    var max = challenge.maxnumber;
    var batch = FIRST_BATCH;
    var start = 0;
    while (start <= max) {
      var began = performance.now();
      var end = Math.min(start + batch - 1, max);
      var pending = [];
      for (var n = start; n <= end; n++) {
        pending.push(crypto.subtle.digest("SHA-256", message(n)));
      }
      var digests = await Promise.all(pending);
      for (var i = 0; i < digests.length; i++) {
        if (sameBytes(digests[i], target)) {
          return start + i;
        }
      }
      var took = Math.max(performance.now() - began, 1);
      start = end + 1;
      batch = Math.max(100, Math.min(MAX_BATCH, Math.round((batch * SLICE) / took)));
      await nextTask();
    }
    return null;
  }

  function readChallenge(form) {
    var challenge = JSON.parse(form.getAttribute("data-altcha-challenge"));
    if (
      !challenge ||
      challenge.algorithm !== "SHA-256" ||
      typeof challenge.challenge !== "string" ||
      typeof challenge.salt !== "string" ||
      typeof challenge.signature !== "string" ||
      !Number.isSafeInteger(challenge.maxnumber) ||
      challenge.maxnumber < 0
    ) {
      throw new Error("the challenge is malformed");
    }
    return challenge;
  }

  function hiddenField(form) {
    var field = form.querySelector('input[name="altcha"]');
    if (!field) {
      field = document.createElement("input");
      field.type = "hidden";
      field.name = "altcha";
      form.appendChild(field);
    }
    return field;
  }

  function submitAgain(form, submitter) {
    if (typeof form.requestSubmit !== "function") {
      form.submit(); // older browsers: no submit event, no validation again
      return;
    }
    try {
      form.requestSubmit(submitter);
    } catch (error) {
      form.requestSubmit(); // the button is no longer the form's
    }
  }

  function protect(form) {
    var state = "solving";
    var waiting = false; // a submit came before the answer
    var submitter = null;
    form.setAttribute("data-altcha-state", state);

    form.addEventListener("submit", function (event) {
      if (state !== "solving") {
        return;
      }
      event.preventDefault();
      waiting = true;
      submitter = event.submitter || null;
      form.setAttribute("aria-busy", "true");
    });

    function done(outcome) {
      state = outcome;
      form.setAttribute("data-altcha-state", state);
      if (waiting) {
        waiting = false;
        form.removeAttribute("aria-busy");
        submitAgain(form, submitter);
      }
    }

    var began = performance.now();
    var challenge;
    try {
      challenge = readChallenge(form);
      if (!window.crypto || !crypto.subtle) {
        throw new Error("no crypto.subtle (not a secure context)");
      }
    } catch (error) {
      done("failed");
      return;
    }
    solve(challenge)
      .then(function (number) {
        if (number === null) {
          throw new Error("no number solves the challenge");
        }
        // btoa throws on a salt that is not Latin-1 (ours is hex and ASCII): failed
        hiddenField(form).value = btoa(
          JSON.stringify({
            algorithm: challenge.algorithm,
            challenge: challenge.challenge,
            number: number,
            salt: challenge.salt,
            signature: challenge.signature,
          })
        );
        form.setAttribute("data-altcha-took", String(Math.round(performance.now() - began)));
        done("solved");
      })
      .catch(function () {
        done("failed");
      });
  }

  function start() {
    var forms = document.querySelectorAll("form[data-altcha-challenge]");
    for (var i = 0; i < forms.length; i++) {
      protect(forms[i]);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
